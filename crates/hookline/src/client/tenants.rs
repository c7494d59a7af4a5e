//! `hookline tenants`: create, list, show, rename and delete tenants (admin key).

use std::collections::BTreeMap;

use clap::Subcommand;
use hookline_proto::v1 as pb;
use serde_json::{Value, json};

use super::output::ts;
use super::{ClientArgs, all_pages, print_deleted, request, rpc};

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Creates a tenant (admin key).
    Create {
        /// A name for people, 1 to 256 characters.
        #[arg(long)]
        name: String,
    },
    /// Lists tenants in creation order.
    List,
    /// Shows one tenant.
    Get {
        /// The tenant's id (`ten_…`).
        id: String,
    },
    /// Renames a tenant (admin key).
    Update {
        /// The tenant's id (`ten_…`).
        id: String,
        /// The new name, 1 to 256 characters.
        #[arg(long)]
        name: String,
    },
    /// Deletes a tenant with every subscription, event, delivery and key of it (admin key).
    Delete {
        /// The tenant's id (`ten_…`).
        id: String,
    },
}

fn tenant_json(t: &pb::Tenant) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "metadata": t.metadata,
        "created_at": ts(t.created_at.as_ref()),
        "updated_at": ts(t.updated_at.as_ref()),
    })
}

const HEADERS: [&str; 3] = ["ID", "NAME", "CREATED"];

fn tenant_row(t: &pb::Tenant) -> Vec<String> {
    vec![t.id.clone(), t.name.clone(), ts(t.created_at.as_ref())]
}

fn print_one(args: &ClientArgs, t: &pb::Tenant) {
    args.format().one(&tenant_json(t), || {
        super::output::print_table(&HEADERS, vec![tenant_row(t)]);
    });
}

pub async fn tenants(args: &ClientArgs, cmd: TenantCommand) -> anyhow::Result<()> {
    let client = args.connect().await?;
    let mut registry = client.registry();
    match cmd {
        TenantCommand::Create { name } => {
            let msg = pb::CreateTenantRequest {
                name,
                metadata: BTreeMap::new(),
                quotas: None,
            };
            let t = registry.create_tenant(request(&client, msg)?).await;
            print_one(args, &t.map_err(rpc)?.into_inner());
        }
        TenantCommand::List => {
            let all = all_pages(async |page_token| {
                let msg = pb::ListTenantsRequest {
                    page_size: hookline_store::MAX_PAGE_LIMIT,
                    page_token,
                };
                let page = registry.list_tenants(request(&client, msg)?).await;
                let page = page.map_err(rpc)?.into_inner();
                Ok((page.tenants, page.next_page_token))
            })
            .await?;
            args.format().items(&all, tenant_json, &HEADERS, tenant_row);
        }
        TenantCommand::Get { id } => {
            let msg = pb::GetTenantRequest { tenant_id: id };
            let t = registry.get_tenant(request(&client, msg)?).await;
            print_one(args, &t.map_err(rpc)?.into_inner());
        }
        TenantCommand::Update { id, name } => {
            let msg = pb::UpdateTenantRequest {
                tenant_id: id,
                name: Some(name),
                metadata: BTreeMap::new(),
                replace_metadata: false,
                quotas: None,
            };
            let t = registry.update_tenant(request(&client, msg)?).await;
            print_one(args, &t.map_err(rpc)?.into_inner());
        }
        TenantCommand::Delete { id } => {
            let msg = pb::DeleteTenantRequest {
                tenant_id: id.clone(),
            };
            registry
                .delete_tenant(request(&client, msg)?)
                .await
                .map_err(rpc)?;
            print_deleted(args.format(), "tenant", &id);
        }
    }
    Ok(())
}
