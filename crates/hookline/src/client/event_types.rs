//! `hookline event-types`: the event-type catalogue — create, list, show, change,
//! archive, delete. Changing it needs an admin key; any key may read it.

use clap::Subcommand;
use hookline_proto::v1 as pb;
use serde_json::{Value, json};

use super::output::{print_table, ts};
use super::{ClientArgs, all_pages, print_deleted, request, rpc};

#[derive(Debug, Subcommand)]
pub enum EventTypeCommand {
    /// Adds an event type to the catalogue (admin key).
    Create {
        /// Dot-separated segments of letters, digits, `_` and `-` (`invoice.paid`).
        name: String,
        /// A description for people.
        #[arg(long, default_value = "")]
        description: String,
        /// A JSON Schema of the payload, as JSON text.
        #[arg(long, default_value = "")]
        schema: String,
    },
    /// Lists the catalogue.
    List {
        /// Include archived event types.
        #[arg(long)]
        archived: bool,
    },
    /// Shows one event type.
    Get {
        /// The event type's name (`invoice.paid`).
        name: String,
    },
    /// Changes the given fields of an event type (admin key).
    Update {
        /// The event type's name (`invoice.paid`).
        name: String,
        /// A new description.
        #[arg(long)]
        description: Option<String>,
        /// A new JSON Schema of the payload, as JSON text.
        #[arg(long)]
        schema: Option<String>,
        /// Archive (`true`) or restore (`false`) the event type.
        #[arg(long)]
        archived: Option<bool>,
    },
    /// Deletes an event type from the catalogue (admin key).
    Delete {
        /// The event type's name (`invoice.paid`).
        name: String,
    },
}

fn event_type_json(e: &pb::EventType) -> Value {
    json!({
        "name": e.name,
        "description": e.description,
        "schema": e.schema,
        "archived": e.archived,
        "created_at": ts(e.created_at.as_ref()),
        "updated_at": ts(e.updated_at.as_ref()),
    })
}

const HEADERS: [&str; 4] = ["NAME", "ARCHIVED", "DESCRIPTION", "CREATED"];

fn event_type_row(e: &pb::EventType) -> Vec<String> {
    vec![
        e.name.clone(),
        if e.archived { "yes" } else { "" }.to_string(),
        e.description.clone(),
        ts(e.created_at.as_ref()),
    ]
}

pub async fn event_types(args: &ClientArgs, cmd: EventTypeCommand) -> anyhow::Result<()> {
    let client = args.connect().await?;
    let mut registry = client.registry();
    let format = args.format();
    let one = match cmd {
        EventTypeCommand::Create {
            name,
            description,
            schema,
        } => {
            let msg = pb::CreateEventTypeRequest {
                name,
                description,
                schema,
            };
            registry.create_event_type(request(&client, msg)?).await
        }
        EventTypeCommand::List { archived } => {
            let all = all_pages(async |page_token| {
                let msg = pb::ListEventTypesRequest {
                    include_archived: archived,
                    page_size: hookline_store::MAX_PAGE_LIMIT,
                    page_token,
                };
                let page = registry.list_event_types(request(&client, msg)?).await;
                let page = page.map_err(rpc)?.into_inner();
                Ok((page.event_types, page.next_page_token))
            })
            .await?;
            format.items(&all, event_type_json, &HEADERS, event_type_row);
            return Ok(());
        }
        EventTypeCommand::Get { name } => {
            let msg = pb::GetEventTypeRequest { name };
            registry.get_event_type(request(&client, msg)?).await
        }
        EventTypeCommand::Update {
            name,
            description,
            schema,
            archived,
        } => {
            anyhow::ensure!(
                description.is_some() || schema.is_some() || archived.is_some(),
                "nothing to change: give at least one of --description, --schema, --archived"
            );
            let msg = pb::UpdateEventTypeRequest {
                name,
                description,
                schema,
                archived,
            };
            registry.update_event_type(request(&client, msg)?).await
        }
        EventTypeCommand::Delete { name } => {
            let msg = pb::DeleteEventTypeRequest { name: name.clone() };
            let res = registry.delete_event_type(request(&client, msg)?).await;
            res.map_err(rpc)?;
            print_deleted(format, "event type", &name);
            return Ok(());
        }
    };
    let e = one.map_err(rpc)?.into_inner();
    format.one(&event_type_json(&e), || {
        print_table(&HEADERS, vec![event_type_row(&e)]);
    });
    Ok(())
}
