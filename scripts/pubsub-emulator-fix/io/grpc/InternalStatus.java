// The Pub/Sub emulator's jar (0.8.20, in Google Cloud CLI 528) bundles a
// grpc-core newer than its grpc-api: when a client resets a stream, the
// server calls InternalStatus.asRuntimeException(Status, Metadata, boolean),
// which that grpc-api lacks, and the NoSuchMethodError it throws keeps the
// emulator from learning the stream is gone. A StreamingPull its client
// closed then goes on taking messages, which come back only after their ack
// deadline and a redelivery backoff. scripts/backends compiles this class
// and puts it before the jar, only when the jar lacks the method: the same
// class, with the method added.
package io.grpc;

public final class InternalStatus {
  public static final Metadata.Key<String> MESSAGE_KEY = Status.MESSAGE_KEY;
  public static final Metadata.Key<Status> CODE_KEY = Status.CODE_KEY;

  private InternalStatus() {}

  public static StatusRuntimeException asRuntimeExceptionWithoutStacktrace(
      Status status, Metadata trailers) {
    return new InternalStatusRuntimeException(status, trailers);
  }

  public static StatusRuntimeException asRuntimeException(
      Status status, Metadata trailers, boolean withStackTrace) {
    return withStackTrace
        ? new StatusRuntimeException(status, trailers)
        : new InternalStatusRuntimeException(status, trailers);
  }
}
