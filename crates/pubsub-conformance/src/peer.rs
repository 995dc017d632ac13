//! Independent clients for interop tests: Python programs run in the
//! virtualenv `scripts/backends up` installs them into (pika, nats-py,
//! redis-py, google-cloud-pubsub), so a driver is checked against a client
//! not built on its own SDK.

use std::process::Stdio;

/// The virtualenv's Python, or a panic saying how to install it.
pub fn python(client: &str) -> String {
    let dir = std::env::var("PUBSUB_TOOLS_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/pubsub-rs",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let py = format!("{dir}/venv/bin/python");
    assert!(
        std::path::Path::new(&py).exists(),
        "the {client} interop peer is not installed at {py}: run `scripts/backends up`"
    );
    py
}

/// Runs `script` with `args` under the virtualenv's Python and returns
/// what it printed; panics, with its stderr, if it fails. `client` names
/// the peer in messages.
pub async fn run(client: &str, script: &str, args: &[&str]) -> String {
    run_with_env(client, script, args, &[]).await
}

/// [`run`] with these environment variables set for the peer (an
/// emulator's address, say).
pub async fn run_with_env(
    client: &str,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> String {
    let out = tokio::process::Command::new(python(client))
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run the {client} peer: {e}"));
    assert!(
        out.status.success(),
        "{client} peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}
