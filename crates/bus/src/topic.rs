//! Topic names, topic patterns and group names.
//!
//! Topics are dot-separated tokens of ASCII letters, digits, `_` and `-` (`orders.created`),
//! so every backend can use them as they are (NATS subjects, SQL text). Patterns follow NATS:
//! `*` matches one token, `>` (last only) matches one or more tokens.
//!
//! A group subscribes to a *pattern list*: one pattern, or several separated by `,`
//! (`inventory.reserved,shipment.failed`), matching a topic when any of them does. One group
//! keeps one order per subject across all of its list's topics, which several groups (one
//! per pattern) could not: a service that acts on a few of a flow's events gets only those,
//! still in order, instead of every event of the flow to drop most of them.

use crate::error::BusError;

/// Longest topic or pattern, in bytes.
pub const TOPIC_BYTES_MAX: usize = 200;
/// Most tokens in a topic or pattern.
pub const TOPIC_TOKENS_MAX: usize = 16;
/// Most patterns in a pattern list.
pub const PATTERNS_MAX: usize = 32;
/// Longest group name, in bytes.
pub const GROUP_BYTES_MAX: usize = 64;

fn token_is_plain(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

fn check_shape(what: &'static str, value: &str) -> Result<(), BusError> {
    if value.is_empty() {
        return Err(BusError::invalid(what, value, "is empty"));
    }
    if value.len() > TOPIC_BYTES_MAX {
        return Err(BusError::invalid(what, value, "is longer than 200 bytes"));
    }
    if value.split('.').count() > TOPIC_TOKENS_MAX {
        return Err(BusError::invalid(what, value, "has more than 16 tokens"));
    }
    Ok(())
}

/// Checks a topic to publish on.
///
/// # Errors
/// [`BusError::InvalidName`] for an empty token, a wildcard or any other character.
pub fn validate_topic(topic: &str) -> Result<(), BusError> {
    check_shape("topic", topic)?;
    if !topic.split('.').all(token_is_plain) {
        return Err(BusError::invalid(
            "topic",
            topic,
            "tokens must be non-empty ASCII letters, digits, '_' or '-', separated by '.'",
        ));
    }
    Ok(())
}

/// Checks a topic pattern to subscribe to.
///
/// # Errors
/// [`BusError::InvalidName`] when a token is malformed or `>` is not last.
pub fn validate_pattern(pattern: &str) -> Result<(), BusError> {
    check_shape("topic pattern", pattern)?;
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (index, token) in tokens.iter().enumerate() {
        let ok = match *token {
            "*" => true,
            ">" => index + 1 == tokens.len(),
            other => token_is_plain(other),
        };
        if !ok {
            return Err(BusError::invalid(
                "topic pattern",
                pattern,
                "tokens are names, '*', or a final '>'",
            ));
        }
    }
    Ok(())
}

/// Checks a pattern list to subscribe a group to: 1 to [`PATTERNS_MAX`] patterns separated
/// by `,`, each as [`validate_pattern`] checks it.
///
/// # Errors
/// [`BusError::InvalidName`] for an empty or malformed pattern, or too many.
pub fn validate_pattern_list(patterns: &str) -> Result<(), BusError> {
    if patterns.split(',').count() > PATTERNS_MAX {
        return Err(BusError::invalid(
            "topic pattern list",
            patterns,
            "has more than 32 patterns",
        ));
    }
    patterns.split(',').try_for_each(validate_pattern)
}

/// A pattern list in its canonical form: its patterns sorted, each once. A group's list is
/// compared in this form, so `b,a` and `a,b,a` name the same subscription.
#[must_use]
pub fn canonical_pattern_list(patterns: &str) -> String {
    let mut list: Vec<&str> = patterns.split(',').collect();
    list.sort_unstable();
    list.dedup();
    list.join(",")
}

/// Checks a consumer group name: 1 to 64 ASCII letters, digits, `_` or `-`.
///
/// # Errors
/// [`BusError::InvalidName`] otherwise.
pub fn validate_group(group: &str) -> Result<(), BusError> {
    if group.len() > GROUP_BYTES_MAX {
        return Err(BusError::invalid("group", group, "is longer than 64 bytes"));
    }
    if !token_is_plain(group) {
        return Err(BusError::invalid(
            "group",
            group,
            "must be non-empty ASCII letters, digits, '_' or '-'",
        ));
    }
    Ok(())
}

/// Whether `topic` matches `patterns`, a pattern list (any of its patterns; all validated).
#[must_use]
pub fn matches(patterns: &str, topic: &str) -> bool {
    patterns
        .split(',')
        .any(|pattern| matches_one(pattern, topic))
}

fn matches_one(pattern: &str, topic: &str) -> bool {
    let mut topic_tokens = topic.split('.');
    for pattern_token in pattern.split('.') {
        match pattern_token {
            ">" => return topic_tokens.next().is_some(),
            "*" => {
                if topic_tokens.next().is_none() {
                    return false;
                }
            }
            name => {
                if topic_tokens.next() != Some(name) {
                    return false;
                }
            }
        }
    }
    topic_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(matches("orders.created", "orders.created"));
        assert!(matches("orders.*", "orders.created"));
        assert!(!matches("orders.*", "orders.created.v2"));
        assert!(matches("orders.>", "orders.created.v2"));
        assert!(!matches("orders.>", "orders"));
        assert!(!matches("orders.created", "orders"));
        assert!(matches(">", "anything.at.all"));
    }

    #[test]
    fn a_pattern_list_matches_what_any_of_its_patterns_matches() {
        let list = "inventory.reserved,shipment.*";
        assert!(validate_pattern_list(list).is_ok());
        assert!(matches(list, "inventory.reserved"));
        assert!(matches(list, "shipment.created"));
        assert!(!matches(list, "inventory.released"));
        assert!(!matches(list, "order.created"));
        assert_eq!(
            canonical_pattern_list("shipment.*,inventory.reserved,shipment.*"),
            "inventory.reserved,shipment.*"
        );
        for bad in ["a,", ",a", "a,,b", "a,b c", "a.>.b,c"] {
            assert!(validate_pattern_list(bad).is_err(), "{bad:?}");
        }
        let too_many = vec!["a"; PATTERNS_MAX + 1].join(",");
        assert!(validate_pattern_list(&too_many).is_err());
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "ü"] {
            assert!(validate_topic(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "a.>.b", "a..*", "a.**"] {
            assert!(validate_pattern(bad).is_err(), "{bad:?}");
        }
        assert!(validate_pattern("a.*.>").is_ok());
        assert!(validate_group("billing-v2").is_ok());
        assert!(validate_group("a.b").is_err());
        assert!(validate_group(&"g".repeat(65)).is_err());
    }
}
