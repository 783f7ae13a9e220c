//! The `skillsync` command line: parses arguments, sets up logging, loads
//! the config and calls the library. No logic of its own.

fn main() -> std::process::ExitCode {
    skillsync::cli::main()
}
