//! `healthcheck`: one GET against a running exporter, for a container's HEALTHCHECK.

use std::time::Duration;

/// One GET with a short timeout; no logging, no state.
pub fn run(url: &str, insecure: bool) -> std::process::ExitCode {
    let ok = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()
        .is_some_and(|rt| {
            rt.block_on(async {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(3))
                    .tls_danger_accept_invalid_certs(insecure)
                    .build();
                match client {
                    Ok(c) => c
                        .get(url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                    Err(_) => false,
                }
            })
        });
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
