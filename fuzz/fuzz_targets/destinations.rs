//! The policy file (GOFE_POLICY_FILE) and the discovery file (GOFE_DISCOVERY=file:...),
//! one YAML shape, parsed by `gofe_proxy::config::file::Table::parse`: never a panic,
//! whatever the text; and a file that parses, written back out from what was parsed
//! (destination names as they show, endpoints, settings as stored, the identities
//! allowed to serve it), parses to the same
//! destinations, endpoints, settings and policies. What the proxy shows of a file
//! (`/config`, `/endpoints`) is a file it would accept, meaning the same.
#![no_main]

use gofe_proxy::config::file::Table;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use std::collections::HashMap;

/// `table` as a destinations file.
fn write(table: &Table) -> String {
    let destinations: Vec<Value> = table
        .destinations
        .iter()
        .map(|(key, entry)| {
            let mut d = json!({"name": key.to_string()});
            if let Some(endpoints) = &entry.endpoints {
                d["endpoints"] = endpoints
                    .iter()
                    .map(|e| {
                        let mut v = json!({"address": e.addr.to_string(), "weight": e.weight});
                        if let Some(id) = &e.identity {
                            v["identity"] = json!(id.to_string());
                        }
                        v
                    })
                    .collect();
            }
            let mut policy: serde_json::Map<String, Value> = entry
                .overrides
                .iter()
                .map(|(var, value)| {
                    let key = var
                        .strip_prefix("GOFE_")
                        .expect("a policy variable")
                        .to_ascii_lowercase();
                    (key, json!(value))
                })
                .collect();
            if let Some(ids) = &entry.policy.identities {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                policy.insert("identities".into(), json!(ids));
            }
            d["policy"] = Value::Object(policy);
            d
        })
        .collect();
    serde_yaml::to_string(&json!({ "destinations": destinations })).expect("YAML out")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = HashMap::new();
    let Ok(table) = Table::parse(text, &base) else {
        return;
    };
    let written = write(&table);
    let again = match Table::parse(&written, &base) {
        Ok(t) => t,
        Err(e) => panic!("{text:?} parsed, but as written back\n{written}\nit does not: {e}"),
    };
    assert_eq!(
        again.destinations.len(),
        table.destinations.len(),
        "{written}"
    );
    for (key, entry) in &table.destinations {
        let other = again
            .destinations
            .get(key)
            .unwrap_or_else(|| panic!("{key} went missing in\n{written}"));
        assert_eq!(other.endpoints, entry.endpoints, "{key}");
        assert_eq!(other.overrides, entry.overrides, "{key}");
        assert_eq!(other.policy, entry.policy, "{key}");
    }
});
