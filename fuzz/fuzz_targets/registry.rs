//! The static registry file parser: any text is a registry or an error naming the file (and,
//! for a bad entry, a line that exists), never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mqtt_adapter::auth::static_registry::RegistryError;
use mqtt_adapter::auth::StaticRegistry;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match StaticRegistry::from_toml(text, Path::new("fuzz.toml")) {
        Ok(_) => {}
        Err(RegistryError::Invalid { line, .. }) => {
            assert!(
                line >= 1 && line <= text.lines().count().max(1) + 1,
                "line {line} of {text:?}"
            );
        }
        Err(e) => assert!(e.to_string().contains("fuzz.toml"), "{e}"),
    }
});
