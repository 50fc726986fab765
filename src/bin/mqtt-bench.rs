//! The `mqtt-bench` binary: parses the scenario, runs it, prints a table (or `--json`).

use std::process::ExitCode;

use clap::Parser;
use mqtt_adapter::bench::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.scenario.common().json;
    match bench::run(&cli.scenario).await {
        Ok(report) => {
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
