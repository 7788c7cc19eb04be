//! The binary: parse the command line, resolve settings, start logging, run a subcommand.

mod cmd;

use qoder_exporter::app;
use qoder_exporter::config::{Cli, Command, Settings};
use std::process::ExitCode;

/// mimalloc: the pipeline allocates and frees many small strings per event; glibc's malloc
/// spent about a sixth of replay's time on them (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    app::no_huge_pages();
    let (command, mut flags) = Cli::parse_checked().into_parts();
    if let Some(Command::Healthcheck { url, insecure }) = &command {
        return cmd::healthcheck::run(url, *insecure);
    }
    if let Some(Command::Demo(_)) = command {
        cmd::demo::defaults(&mut flags);
    }
    let settings = match Settings::resolve(flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qoder-exporter: {e:#}");
            return ExitCode::from(2);
        }
    };
    cmd::init_logging(&settings.log_level, settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "could not start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Some(Command::Demo(d)) => cmd::demo::run(settings, d).await,
            Some(Command::Dump(d)) => cmd::dump::run(settings, d).await,
            Some(Command::Replay(r)) => cmd::replay::run(settings, r).await,
            Some(Command::Healthcheck { .. }) | None => {
                app::run(settings, app::shutdown_signal()).await
            }
        }
    });
    if let Err(e) = result {
        tracing::error!("{e:#}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
