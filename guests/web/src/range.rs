//! `Range: bytes=…` of one span, as RFC 9110 (section 14) reads it.

/// A range that asks for no byte of the representation: answered 416.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// The bytes a `Range` header asks for out of `size`, first and last inclusive. `Ok(None)`
/// serves the whole representation: no header, another unit, several ranges (which RFC 9110
/// lets a server ignore) or an invalid one. Numbers past `u64` are read as `u64::MAX`: still
/// valid syntax, so a first byte that large is unsatisfiable and a last byte or suffix that
/// large reaches the end.
pub fn byte_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some((unit, spec)) =
        header.and_then(|value| value.trim_matches([' ', '\t']).split_once('='))
    else {
        return Ok(None);
    };
    // Range units are case-insensitive; no whitespace is allowed around `=` or `-`.
    if !unit.eq_ignore_ascii_case("bytes") {
        return Ok(None);
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(None);
    };
    match (Position::read(first), Position::read(last)) {
        // `last < first` is invalid, compared exactly even past u64.
        (Some(first), Some(last)) if first <= last => {
            if first.value >= size {
                return Err(Unsatisfiable);
            }
            Ok(Some((first.value, last.value.min(size - 1))))
        }
        (Some(first), None) if last.is_empty() => {
            if first.value >= size {
                return Err(Unsatisfiable);
            }
            Ok(Some((first.value, size - 1)))
        }
        (None, Some(suffix)) if first.is_empty() => {
            if suffix.value == 0 || size == 0 {
                return Err(Unsatisfiable);
            }
            Ok(Some((size - suffix.value.min(size), size - 1)))
        }
        _ => Ok(None),
    }
}

/// A `1*DIGIT` position: its digits without leading zeros, which order positions of any size
/// (by length, then digit by digit), and its value, saturated at `u64::MAX`.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Position<'a> {
    digits: (usize, &'a str),
    value: u64,
}

impl<'a> Position<'a> {
    /// `None` for anything but digits (a sign, a space, nothing).
    fn read(text: &'a str) -> Option<Position<'a>> {
        if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        let digits = text.trim_start_matches('0');
        let value = digits.bytes().fold(0u64, |number, digit| {
            number
                .saturating_mul(10)
                .saturating_add(u64::from(digit - b'0'))
        });
        Some(Position {
            digits: (digits.len(), digits),
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing;
    use proptest::prelude::*;

    #[test]
    fn ranges_as_rfc_9110_reads_them() {
        let range = |header, size| byte_range(Some(header), size);
        assert_eq!(byte_range(None, 100), Ok(None));
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=50-1000", 100), Ok(Some((50, 99))));
        assert_eq!(range("bytes=100-", 100), Err(Unsatisfiable));
        assert_eq!(range("bytes=-0", 100), Err(Unsatisfiable));
        assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(range("bytes=9-1", 100), Ok(None));
        assert_eq!(range("items=1-2", 100), Ok(None));
    }

    /// What the target found in the parser this replaced (Lenzeye's): signs and spaces taken
    /// as digits, numbers past u64 ignored instead of read, the unit's case not ignored.
    #[test]
    fn regressions_found_by_the_target() {
        let range = |header, size| byte_range(Some(header), size);
        assert_eq!(range("bytes=+5-10", 100), Ok(None));
        assert_eq!(range("bytes=-+5", 100), Ok(None));
        assert_eq!(range("bytes=0 - 9", 100), Ok(None));
        assert_eq!(range("bytes= 0-9", 100), Ok(None));
        assert_eq!(range("Bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(
            range("bytes=0-99999999999999999999", 100),
            Ok(Some((0, 99)))
        );
        assert_eq!(range("bytes=-99999999999999999999", 100), Ok(Some((0, 99))));
        assert_eq!(
            range("bytes=99999999999999999999-", 100),
            Err(Unsatisfiable)
        );
        assert_eq!(range("bytes=0-", 0), Err(Unsatisfiable));
    }

    /// RFC 9110's grammar, read differently from the parser: numbers as u128 (the strategy's
    /// have at most 25 digits), the size widened to match, and the server's choice (one span
    /// served, several ignored) applied last.
    fn reference(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
        let Some(value) = header.map(|v| v.trim_matches([' ', '\t'])) else {
            return Ok(None);
        };
        let Some(equals) = value.find('=') else {
            return Ok(None);
        };
        let (unit, set) = (&value[..equals], &value[equals + 1..]);
        if !unit.eq_ignore_ascii_case("bytes") || set.contains(',') {
            return Ok(None);
        }
        let digits = |text: &str| !text.is_empty() && text.chars().all(|c| c.is_ascii_digit());
        // Compares digit strings as numbers of any size, against u128 for the size.
        let value_of = |text: &str| -> u128 {
            let text = text.trim_start_matches('0');
            if text.len() > 30 {
                u128::MAX
            } else {
                text.parse::<u128>().unwrap_or(0)
            }
        };
        let size = u128::from(size);
        let Some(dash) = set.find('-') else {
            return Ok(None);
        };
        let (first, last) = (&set[..dash], &set[dash + 1..]);
        let narrow = |n: u128| u64::try_from(n).expect("within the size");
        if digits(first) && (last.is_empty() || digits(last)) {
            let first = value_of(first);
            let last = if last.is_empty() {
                None
            } else {
                Some(value_of(last))
            };
            if last.is_some_and(|last| last < first) {
                return Ok(None); // invalid: ignored
            }
            if first >= size {
                return Err(Unsatisfiable);
            }
            let end = last.map_or(size - 1, |last| last.min(size - 1));
            return Ok(Some((narrow(first), narrow(end))));
        }
        if first.is_empty() && digits(last) {
            let suffix = value_of(last);
            if suffix == 0 || size == 0 {
                return Err(Unsatisfiable);
            }
            return Ok(Some((narrow(size - suffix.min(size)), narrow(size - 1))));
        }
        Ok(None)
    }

    /// Headers built from the pieces a range is made of, and some noise around them.
    fn header() -> impl Strategy<Value = Option<String>> {
        let number = prop_oneof![
            (0u64..300).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "[0-9]{19,25}",
            Just(String::new()),
            "[+ -]?[0-9]{1,3}[ ]?",
        ];
        let unit = prop_oneof![
            Just("bytes".to_owned()),
            Just("BYTES".to_owned()),
            Just("Bytes".to_owned()),
            Just("items".to_owned()),
            "[a-zA-Z ]{0,6}",
        ];
        let spec = (number.clone(), "[-,= ]{0,2}|-", number)
            .prop_map(|(first, dash, last)| format!("{first}{dash}{last}"));
        prop_oneof![
            1 => Just(None),
            8 => (unit, "=| =|= ", prop::collection::vec(spec, 1..3), "[ \t]{0,2}")
                .prop_map(|(unit, equals, specs, pad)| Some(format!("{pad}{unit}{equals}{}{pad}", specs.join(",")))),
            1 => any::<String>().prop_map(Some),
        ]
    }

    fn size() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..300, any::<u64>(), Just(u64::MAX)]
    }

    /// Never a range outside the object, and the same answer as the reference model.
    #[test]
    fn byte_ranges_agree_with_rfc_9110() {
        fuzzing::run(
            "byte_ranges",
            2_000,
            (header(), size()),
            |(header, size)| {
                let got = byte_range(header.as_deref(), size);
                if let Ok(Some((first, last))) = got {
                    prop_assert!(
                        first <= last && last < size,
                        "{first}-{last} outside {size} bytes"
                    );
                }
                prop_assert_eq!(got, reference(header.as_deref(), size));
                Ok(())
            },
        );
    }
}
