//! Entry point only: the application is the `ringpush` library.

use clap::Parser;

fn main() {
    let code = ringpush::cli::run(ringpush::cli::Cli::parse());
    std::process::exit(code);
}
