//! `hostmem policy check|explain|lint`.

use std::path::PathBuf;

use hostmem_jail::compiler::CompileOptions;
use hostmem_jail::policy::{parse_const_str, ParseOptions};
use hostmem_jail::tools;

/// Seccomp policy tools.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCmd {
    /// Parse and compile policies; print the instruction count of each.
    Check {
        /// Policy files.
        files: Vec<PathBuf>,
        /// Rewrite an @include prefix: FROM=TO (e.g. /usr/share/policy/crosvm/=./policies/).
        #[arg(long)]
        rewrite_prefix: Option<String>,
    },
    /// What the compiled filter does for one call.
    Explain {
        /// Policy file.
        file: PathBuf,
        /// Syscall name or number.
        syscall: String,
        /// Up to six arguments (numbers or constants such as PROT_READ|PROT_EXEC).
        args: Vec<String>,
        /// Rewrite an @include prefix: FROM=TO.
        #[arg(long)]
        rewrite_prefix: Option<String>,
    },
    /// Flag dangerous rules.
    Lint {
        /// Policy file.
        file: PathBuf,
        /// Rewrite an @include prefix: FROM=TO.
        #[arg(long)]
        rewrite_prefix: Option<String>,
    },
}

fn options(rewrite: &Option<String>) -> anyhow::Result<CompileOptions> {
    let rewrite_prefix = match rewrite {
        Some(r) => {
            let (from, to) = r
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--rewrite-prefix wants FROM=TO"))?;
            Some((from.to_string(), PathBuf::from(to)))
        }
        None => None,
    };
    Ok(CompileOptions {
        parse: ParseOptions {
            rewrite_prefix,
            default: None,
        },
        log_violations: false,
    })
}

/// Runs a policy command; returns the exit code.
pub fn run(cmd: PolicyCmd) -> anyhow::Result<i32> {
    match cmd {
        PolicyCmd::Check {
            files,
            rewrite_prefix,
        } => {
            let opts = options(&rewrite_prefix)?;
            let mut failed = 0;
            for f in &files {
                match tools::check(f, &opts) {
                    Ok(r) => println!(
                        "ok   {}: {} syscalls, {} instructions, {} µs",
                        f.display(),
                        r.syscalls,
                        r.instructions,
                        r.micros
                    ),
                    Err(e) => {
                        failed += 1;
                        println!("FAIL {e}");
                    }
                }
            }
            println!("{} checked, {failed} failed", files.len());
            Ok(i32::from(failed > 0))
        }
        PolicyCmd::Explain {
            file,
            syscall,
            args,
            rewrite_prefix,
        } => {
            let mut a = [0u64; 6];
            for (i, s) in args.iter().take(6).enumerate() {
                a[i] = parse_const_str(s).ok_or_else(|| anyhow::anyhow!("bad argument {s}"))?;
            }
            println!(
                "{}",
                tools::explain(&file, &options(&rewrite_prefix)?, &syscall, a)?
            );
            Ok(0)
        }
        PolicyCmd::Lint {
            file,
            rewrite_prefix,
        } => {
            let findings = tools::lint(&file, &options(&rewrite_prefix)?)?;
            for f in &findings {
                println!("{}: {}: {}", file.display(), f.syscall, f.what);
            }
            println!("{} findings", findings.len());
            Ok(i32::from(!findings.is_empty()))
        }
    }
}
