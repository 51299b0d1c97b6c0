//! `moerge demo`: a private daemon on the tiny library, every built-in policy compared.

use std::process::ExitCode;

use anyhow::Result;

use crate::args::DemoArgs;

pub fn run(_args: &DemoArgs) -> Result<ExitCode> {
    anyhow::bail!("not yet")
}
