//! `gofe inject`: YAML documents in (`gofe::inject::inject_documents`, the CLI's entry),
//! with or without the namespace asking for injection. Never a panic, whatever the
//! text and its annotations; what comes out is YAML, and injecting it again gives it
//! back unchanged (the injector's promise: injecting twice gives what injecting once
//! gives).
//!
//! Input: a first byte (bit 0: the namespace is annotated `gofe.io/inject: enabled`),
//! then the YAML.
#![no_main]

use gofe::inject::{INJECT_ANNOTATION, Injector, inject_documents};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let injector = Injector {
        image: "ghcr.io/gofe/gofe:0.1.0".into(),
        init_image: "ghcr.io/gofe/gofe-init:0.1.0".into(),
        identity_addr: "gofe-identity.gofe-system.svc:8443".into(),
        token_audience: "identity.gofe.io".into(),
        trust_domain: "cluster.local".into(),
    };
    let mut namespace = BTreeMap::new();
    if flags & 1 != 0 {
        namespace.insert(INJECT_ANNOTATION.to_string(), "enabled".to_string());
    }
    // It warns on stderr of a pod it leaves alone.
    let Ok(once) = gofe_fuzz::quietly(|| inject_documents(text, &injector, &namespace)) else {
        return;
    };
    let twice = match gofe_fuzz::quietly(|| inject_documents(&once, &injector, &namespace)) {
        Ok(t) => t,
        Err(e) => panic!("injected\n{once}\nbut injecting that again fails: {e:#}"),
    };
    assert_eq!(twice, once, "injecting twice differs from injecting once");
});
