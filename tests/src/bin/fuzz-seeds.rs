//! Writes the fuzz targets' seed inputs: `fuzz-seeds DIR` fills `DIR/<target>/` (see
//! `patch_tests::fuzz::write_seeds`). `scripts/fuzz.sh` runs it.

fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: fuzz-seeds DIR");
        return std::process::ExitCode::from(2);
    };
    match patch_tests::fuzz::write_seeds(std::path::Path::new(&dir)) {
        Ok(n) => {
            eprintln!("{n} seed inputs written under {}", dir.to_string_lossy());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: writing fuzz seeds under {}: {e}",
                dir.to_string_lossy()
            );
            std::process::ExitCode::FAILURE
        }
    }
}
