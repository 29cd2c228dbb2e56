//! `minserve fetch`: download a model of the catalog (or check a path) ahead of time.

use clap::Args;

#[derive(Args)]
pub struct FetchArgs {
    /// Catalog alias (default: the default model) or a path.
    model: Option<String>,
    /// List the catalog's aliases instead.
    #[arg(long)]
    list: bool,
}

pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    let catalog = minserve_hub::catalog();
    if args.list {
        for alias in catalog.aliases() {
            if let Some((_, entry)) = catalog.get(alias) {
                println!("{alias:32} {}", entry.description);
            }
        }
        return Ok(());
    }
    let model = args
        .model
        .unwrap_or_else(|| minserve_hub::default_model().to_string());
    let path = minserve_hub::resolve(&model, &minserve_hub::FetchOptions::default())?;
    // Last line is the path alone, so scripts can take it with `tail -n1`.
    println!("{}", path.display());
    Ok(())
}
