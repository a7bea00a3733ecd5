//! `gofe inject --webhook`: an AdmissionReview (JSON) in, as the API server sends it,
//! answered by `gofe::webhook::review_response`. Never a panic; the answer is a v1
//! AdmissionReview for the same uid; a JSON patch in it applies to the pod that came
//! in, and the patched pod, reviewed again, is allowed and needs no patch (what the
//! webhook asks the API server to do is what it meant).
#![no_main]

use base64::Engine;
use gofe::inject::Injector;
use gofe::webhook::review_response;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn patch_of(response: &Value) -> Option<json_patch::Patch> {
    let b64 = response["response"]["patch"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("the patch is base64");
    Some(serde_json::from_slice(&bytes).expect("the patch is a JSON patch"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(review) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let injector = Injector {
        image: "ghcr.io/gofe/gofe:0.1.0".into(),
        init_image: "ghcr.io/gofe/gofe-init:0.1.0".into(),
        identity_addr: "gofe-identity.gofe-system.svc:8443".into(),
        token_audience: "identity.gofe.io".into(),
        trust_domain: "cluster.local".into(),
    };
    let Ok(answer) = gofe_fuzz::quietly(|| review_response(&injector, &review)) else {
        return;
    };
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    let Some(patch) = patch_of(&answer) else {
        return;
    };
    let mut pod = review["request"]["object"].clone();
    if let Err(e) = json_patch::patch(&mut pod, &patch) {
        panic!("the webhook's patch does not apply to the pod it was made for: {e}");
    }
    let mut again = review.clone();
    again["request"]["object"] = pod;
    let answer = gofe_fuzz::quietly(|| review_response(&injector, &again))
        .expect("the patched pod is reviewed too");
    assert_eq!(
        answer["response"]["allowed"], true,
        "the patched pod is refused: {answer}"
    );
    assert!(
        patch_of(&answer).is_none(),
        "the patched pod needs patching again: {answer}"
    );
});
