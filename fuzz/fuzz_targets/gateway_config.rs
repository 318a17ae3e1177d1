//! The gateway's TOML configuration: parsing and validation of arbitrary text.
//!
//! Properties: never panics; a configuration that validates has routes that compile (what
//! the gateway does next at start-up); and validating a parsed configuration again agrees.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_gateway::Config;
use trellis_gateway::bench::RouteMatchers;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text) {
        assert!(
            config.validate().is_ok(),
            "validate disagrees with from_toml"
        );
        if let Err(error) = RouteMatchers::from_config(&config) {
            panic!("a validated configuration has a route that does not compile: {error}");
        }
    }
});
