//! CPU lists and thread pinning.
//!
//! [`parse_cpu_list`] reads the `--cpus` syntax (`0,2-3`, the same form as
//! `taskset -c` and `/sys/devices/system/cpu/online`); the result is sorted and
//! free of duplicates, and never empty. [`available_cores`] lists the CPUs this
//! process may run on, and [`pin_current`] pins the calling thread to one of
//! them. Pinning is best effort: a `false` return means the OS refused (e.g. a
//! container cpuset), never a panic.

use thiserror::Error;

/// The largest CPU number accepted in a list (guards against `0-4000000000`
/// allocating a huge vector).
pub const MAX_CPU_ID: usize = 65_535;

/// Errors from parsing a CPU list.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AffinityError {
    /// The text is not a CPU list.
    #[error("invalid CPU list `{input}`: {reason}; expected a comma-separated list of CPU numbers and ranges like `0,2-3`")]
    Invalid {
        /// The text as given.
        input: String,
        /// What was wrong with it.
        reason: String,
    },
}

fn invalid(input: &str, reason: impl Into<String>) -> AffinityError {
    AffinityError::Invalid {
        input: input.to_string(),
        reason: reason.into(),
    }
}

fn parse_cpu(input: &str, item: &str) -> Result<usize, AffinityError> {
    let item = item.trim();
    let cpu: usize = item
        .parse()
        .map_err(|_| invalid(input, format!("`{item}` is not a CPU number")))?;
    if cpu > MAX_CPU_ID {
        return Err(invalid(
            input,
            format!("CPU {cpu} is larger than {MAX_CPU_ID}"),
        ));
    }
    Ok(cpu)
}

/// Parses a CPU list such as `0,2-3` or `4-7,12` into sorted, unique CPU ids.
///
/// Whitespace around items is ignored; an empty list, an empty item, a
/// reversed range (`3-1`) or a CPU above [`MAX_CPU_ID`] is an error.
pub fn parse_cpu_list(input: &str) -> Result<Vec<usize>, AffinityError> {
    if input.trim().is_empty() {
        return Err(invalid(input, "the list is empty"));
    }
    let mut cpus = Vec::new();
    for item in input.split(',') {
        if item.trim().is_empty() {
            return Err(invalid(input, "empty item between commas"));
        }
        match item.split_once('-') {
            Some((lo, hi)) => {
                let lo = parse_cpu(input, lo)?;
                let hi = parse_cpu(input, hi)?;
                if lo > hi {
                    return Err(invalid(input, format!("range {lo}-{hi} is reversed")));
                }
                cpus.extend(lo..=hi);
            }
            None => cpus.push(parse_cpu(input, item)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// The CPU ids this process may run on, sorted. Empty if the OS does not say
/// (then callers run unpinned).
pub fn available_cores() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    ids
}

/// Pins the calling thread to `core_id`. Returns `false` if the OS refused.
pub fn pin_current(core_id: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: core_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_cpus_and_ranges_are_sorted_and_deduplicated() {
        assert_eq!(parse_cpu_list("0,2-3").unwrap(), vec![0, 2, 3]);
        assert_eq!(parse_cpu_list("5, 1-2 ,2").unwrap(), vec![1, 2, 5]);
        assert_eq!(parse_cpu_list("7").unwrap(), vec![7]);
        assert_eq!(parse_cpu_list("3-3").unwrap(), vec![3]);
    }

    #[test]
    fn malformed_lists_are_rejected_with_the_expected_form() {
        for bad in [
            "", " ", "a", "1,,2", "1-", "-1", "3-1", "1-2-3", "0x1", "99999999", ",",
        ] {
            let err = parse_cpu_list(bad).unwrap_err().to_string();
            assert!(err.contains("expected"), "{bad}: {err}");
            assert!(err.contains("0,2-3"), "{bad}: {err}");
        }
    }

    #[test]
    fn available_cores_are_sorted() {
        let cores = available_cores();
        assert!(cores.windows(2).all(|w| w[0] < w[1]));
    }
}
