//! The OpenMetrics text that `/metrics` serves, read into exact samples, so that a test
//! compares values rather than substrings (`x_total 1` is a prefix of `x_total 12`).

use std::collections::{BTreeMap, HashMap};

/// Every sample of one scrape: (metric name, labels) -> value.
#[derive(Debug, Default)]
pub struct Samples(HashMap<(String, BTreeMap<String, String>), f64>);

impl Samples {
    /// Reads an exposition; any line that is neither a comment nor a well-formed sample is
    /// an error naming it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut samples = HashMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, value) =
                sample(line).ok_or_else(|| format!("not an OpenMetrics sample: {line:?}"))?;
            if samples.insert((name, labels), value).is_some() {
                return Err(format!("sample given twice: {line:?}"));
            }
        }
        Ok(Self(samples))
    }

    /// The value of `name` with exactly these labels, if the scrape has it.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.0.get(&(name.to_owned(), labels)).copied()
    }
}

/// `name{a="x",b="y"} value [timestamp]`, label values with `\\`, `\"` and `\n` escapes.
fn sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let name_end = line.find(['{', ' '])?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let (value, after) = quoted(after)?;
            labels.insert(key.to_owned(), value);
            rest = after.strip_prefix(',').unwrap_or(after);
        }
    }
    let mut fields = rest.strip_prefix(' ')?.split(' ');
    let value = fields.next()?.parse().ok()?;
    // At most a timestamp may follow.
    if fields.nth(1).is_some() || name.is_empty() {
        return None;
    }
    Some((name.to_owned(), labels, value))
}

/// A label value up to its closing quote, and what follows the quote.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}
