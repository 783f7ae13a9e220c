//! The per-tenant wake-up of the fetch workers: the webhook handler and a
//! reconciliation notify a tenant's [`Notify`] when they queue work, and
//! that tenant's fetch worker loop claims at once instead of at its next
//! poll. Its own module so the HTTP edge and reconciliation
//! can wake the fetcher without depending on it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::config::Config;

/// Tenant name → the `Notify` its fetch workers wait on; shared by every
/// producer of work in one process.
pub type Wake = Arc<HashMap<String, Arc<Notify>>>;

/// One wake-up per configured tenant.
pub fn for_tenants(config: &Config) -> Wake {
    Arc::new(
        config
            .tenants
            .iter()
            .map(|t| (t.name.clone(), Arc::new(Notify::new())))
            .collect(),
    )
}
