//! Sets `QODER_EXPORTER_REVISION` (shown in `qoder_exporter_build_info{revision}`): the build
//! environment's value when given (the container image passes its `REVISION` build arg), else
//! the git commit of the checkout (uncommitted changes are not marked: cargo does not rerun a
//! build script for every edit, so such a mark would go stale); `unknown` outside git.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=QODER_EXPORTER_REVISION");
    if let Ok(given) = std::env::var("QODER_EXPORTER_REVISION")
        && !given.is_empty()
    {
        println!("cargo:rustc-env=QODER_EXPORTER_REVISION={given}");
        return;
    }
    // Rerun when HEAD moves: a commit or a checkout.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        // Only files that exist: a missing one would rerun the script on every build.
        let head_ref = git(&["symbolic-ref", "-q", "HEAD"]);
        for f in ["HEAD", "packed-refs"]
            .into_iter()
            .chain(head_ref.as_deref())
        {
            let path = format!("{dir}/{f}");
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    let revision =
        git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=QODER_EXPORTER_REVISION={revision}");
}
