//! `dump`: sessions' events from the API as JSON Lines.

use qoder_exporter::config::{DumpFlags, Settings};

pub async fn run(settings: Settings, flags: DumpFlags) -> anyhow::Result<()> {
    qoder_exporter::offline::dump(&settings, &flags).await
}
