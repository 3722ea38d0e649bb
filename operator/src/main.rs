//! The quantops operator (not yet built: see the README's status table).
fn main() -> anyhow::Result<()> {
    anyhow::bail!("the operator is not built yet; see README.md")
}
