pub fn run(_a: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
#[derive(clap::Args, Debug)]
pub struct DemoArgs {}
