//! Ids the server issues (rooms, messages, attachments, notifications): a positive
//! 64-bit integer written in decimal, with no sign, no leading zero and no whitespace.
//! That one spelling is the id; any other spelling of the same number names nothing.
//! Both services hold to it, so a room is never known under two names (a removal
//! spelled `"042"` missing a listener registered as `"42"`).

/// The number an id names, if `raw` is an id exactly as the server spells it.
pub fn parse(raw: &str) -> Option<i64> {
    let canonical = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) && !raw.starts_with('0');
    if !canonical {
        return None;
    }
    // Only overflow can fail here; an id past i64 names nothing either.
    raw.parse::<i64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_issued_spelling_names_an_id() {
        assert_eq!(parse("42"), Some(42));
        assert_eq!(parse("9223372036854775807"), Some(i64::MAX));
        for other in [
            "042",
            "0042",
            "+42",
            "-42",
            " 42",
            "42 ",
            "4.2e1",
            "42.0",
            "0x2a",
            "0",
            "00",
            "",
            "٤٢",
            "9223372036854775808",
        ] {
            assert_eq!(parse(other), None, "{other:?}");
        }
    }
}
