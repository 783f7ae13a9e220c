//! Fuzz target for the webhook's parsing and verification path: arbitrary
//! bytes through `parse_payload` (JSON, fields, UUID, the `document.url`
//! origin guard). It must never panic, and whatever it accepts for fetching
//! must name a known type, a canonical UUID, and a URL on the tenant's origin.
//!
//! Run (bounded): `cd fuzz && cargo +nightly fuzz run webhook_payload -- -max_total_time=60`

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use skillsync::config::Config;

fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        Config::from_toml(
            "[[tenant]]\nname = \"acme\"\nwebhook_secrets = [\"fuzz-secret-1\"]\napi_base = \"https://integration-api-we.skillsworkflow.com\"\nextraction_base = \"https://apiv2-acme.skillsworkflow.com\"\napp_tenant = \"t\"\napp_id = \"i\"\napp_secret = \"s\"\n",
            None,
        )
        .expect("fuzz config")
    })
}

fuzz_target!(|data: &[u8]| {
    let c = config();
    let base = &c.tenants[0].api_base;
    if let Ok(p) = skillsync::payload::parse_payload(data, base, c) {
        if !p.ignored {
            let ty = p.doc_type.as_deref().expect("a fetched event has a type");
            assert!(ty == "job" || ty == "project", "type {ty}");
            let id = p.doc_id.as_deref().expect("a fetched event has an id");
            let parsed = uuid::Uuid::try_parse(id).expect("id is a UUID");
            assert_eq!(parsed.hyphenated().to_string(), id, "id is canonical");
            let v: serde_json::Value = serde_json::from_slice(data).expect("accepted input is JSON");
            let url = v["document"]["url"].as_str().expect("url is a string");
            let u = url::Url::parse(url).expect("accepted url parses");
            assert_eq!(u.scheme(), "https", "url {url}");
            assert_eq!(u.host_str(), Some("integration-api-we.skillsworkflow.com"), "url {url}");
            assert_eq!(u.port_or_known_default(), Some(443), "url {url}");
            assert!(u.username().is_empty() && u.password().is_none(), "url {url}");
        }
    }
});
