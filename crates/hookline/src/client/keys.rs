//! `hookline keys`: API keys over the API — list, create (the token is shown once),
//! revoke. (`hookline admin create-key` makes the first key without a server.)

use clap::Subcommand;
use hookline_proto::v1 as pb;
use serde_json::{Value, json};

use super::output::{print_table, ts};
use super::{ClientArgs, all_pages, request, rpc};

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Lists a tenant's keys, or the admin keys without `--tenant` (admin key).
    List {
        /// The tenant (`ten_…`); without it, the admin keys.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Creates a key and prints its token once.
    Create {
        /// A name for people, 1 to 256 characters.
        #[arg(long)]
        name: String,
        /// The tenant the key may act on; without it, an admin key (admin key needed).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revokes a key at once: it is refused from then on.
    Revoke {
        /// The key's id (`key_…`).
        id: String,
    },
}

fn key_json(k: &pb::ApiKey) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "tenant_id": k.tenant_id,
        "token_prefix": k.token_prefix,
        "created_at": ts(k.created_at.as_ref()),
        "revoked_at": ts(k.revoked_at.as_ref()),
    })
}

const HEADERS: [&str; 6] = ["ID", "NAME", "TENANT", "PREFIX", "CREATED", "REVOKED"];

fn key_row(k: &pb::ApiKey) -> Vec<String> {
    let tenant = if k.tenant_id.is_empty() {
        "(admin)".to_string()
    } else {
        k.tenant_id.clone()
    };
    vec![
        k.id.clone(),
        k.name.clone(),
        tenant,
        k.token_prefix.clone(),
        ts(k.created_at.as_ref()),
        ts(k.revoked_at.as_ref()),
    ]
}

pub async fn keys(args: &ClientArgs, cmd: KeyCommand) -> anyhow::Result<()> {
    let client = args.connect().await?;
    let mut registry = client.registry();
    let format = args.format();
    match cmd {
        KeyCommand::List { tenant } => {
            let all = all_pages(async |page_token| {
                let msg = pb::ListApiKeysRequest {
                    tenant_id: tenant.clone().unwrap_or_default(),
                    page_size: hookline_store::MAX_PAGE_LIMIT,
                    page_token,
                };
                let page = registry.list_api_keys(request(&client, msg)?).await;
                let page = page.map_err(rpc)?.into_inner();
                Ok((page.api_keys, page.next_page_token))
            })
            .await?;
            format.items(&all, key_json, &HEADERS, key_row);
        }
        KeyCommand::Create { name, tenant } => {
            let msg = pb::CreateApiKeyRequest {
                name,
                tenant_id: tenant.unwrap_or_default(),
            };
            let res = registry.create_api_key(request(&client, msg)?).await;
            let res = res.map_err(rpc)?.into_inner();
            let key = res.api_key.unwrap_or_default();
            let mut v = key_json(&key);
            v["token"] = Value::String(res.token.clone());
            format.one(&v, || {
                print_table(&HEADERS, vec![key_row(&key)]);
                println!("\ntoken (shown only now): {}", res.token);
            });
        }
        KeyCommand::Revoke { id } => {
            let msg = pb::RevokeApiKeyRequest { api_key_id: id };
            let key = registry.revoke_api_key(request(&client, msg)?).await;
            let key = key.map_err(rpc)?.into_inner();
            format.one(&key_json(&key), || {
                print_table(&HEADERS, vec![key_row(&key)]);
            });
        }
    }
    Ok(())
}
