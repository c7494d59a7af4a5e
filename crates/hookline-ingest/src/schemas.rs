//! The JSON Schemas of event types, compiled once and cached for publishes.
//!
//! A publish of an event type whose catalogue entry has a schema is checked against it.
//! Compiled schemas are kept per event type; a registry announcement about an event type
//! drops its entry at once (a `Resync` drops all), and entries expire after a short time
//! as a safety net, like the subscription cache.

use std::sync::Arc;
use std::time::Duration;

use hookline_core::schema::PayloadSchema;
use hookline_store::StoreError;
use hookline_store::port::RegistryStore;

use hookline_changes::ChangeCache;

const TTL: Duration = Duration::from_secs(30);
const MAX_TYPES: u64 = 10_000;

type Entry = Option<Arc<PayloadSchema>>;

#[derive(Clone)]
pub(crate) struct SchemaCache {
    registry: Arc<dyn RegistryStore>,
    cache: ChangeCache<String, Entry>,
}

impl SchemaCache {
    pub(crate) fn new(registry: Arc<dyn RegistryStore>) -> Self {
        Self {
            registry,
            cache: ChangeCache::new(MAX_TYPES, TTL),
        }
    }

    /// The compiled schema of an event type; `None` when it has none or is not in the
    /// catalogue. A stored schema that does not compile (set before schemas were checked)
    /// is logged and not enforced, rather than refusing every publish of the type.
    pub(crate) async fn get(&self, event_type: &str) -> Result<Entry, StoreError> {
        self.cache
            .get_or_load(event_type, self.load(event_type))
            .await
    }

    async fn load(&self, event_type: &str) -> Result<Entry, StoreError> {
        Ok(match self.registry.get_event_type(event_type).await {
            Ok(et) => et.schema.and_then(|text| {
                PayloadSchema::compile("schema", &text)
                    .map_err(|e| tracing::warn!(event_type, error = %e, "the stored schema of this event type does not compile; it is not enforced"))
                    .ok()
                    .map(Arc::new)
            }),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        })
    }

    pub(crate) async fn invalidate(&self, event_type: &str) {
        self.cache.invalidate(&event_type.to_string()).await;
    }

    pub(crate) fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }
}
