fn main() {
    // The lead wires the CLI to the `quantizer_job` library.
}
