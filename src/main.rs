fn main() -> std::process::ExitCode {
    bexar::cli::main()
}
