//! Chat templates: Jinja rendered with minijinja the way transformers' `apply_chat_template`
//! renders it with jinja2.
//!
//! transformers compiles a template in a sandboxed jinja2 environment with `trim_blocks` and
//! `lstrip_blocks`, the `loopcontrols` extension, its own `tojson` filter (Python's
//! `json.dumps` with `ensure_ascii=False`, not jinja2's HTML-escaping one), and the globals
//! `raise_exception` and `strftime_now`. It renders with `messages`, `tools` (none),
//! `documents` (none), `add_generation_prompt` and the named special tokens (`bos_token`,
//! `eos_token`, ...). The environment here does the same; Python's string and dict methods
//! (`.strip()`, `.items()`, ...) come from minijinja-contrib's pycompat.
//!
//! One difference on purpose: an undefined variable may be tested (`{% if x %}`, `x is
//! defined`) as in jinja2, but printing it, iterating it or passing it on is an error naming
//! the variables the template reads and nobody gave (jinja2 prints an empty string).

use crate::{Error, Result};
use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;

/// One turn of a conversation, as transformers' `{"role": ..., "content": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("assistant", content)
    }
}

/// A message as the template sees it: a map with `role` then `content`, in that order (as
/// the Python dict, which `tojson` shows).
#[derive(Debug)]
struct MessageValue(ChatMessage);

impl Object for MessageValue {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }
    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// The name of the template inside its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// What `raise_exception` prefixes to its message, so the caller can tell it from other errors.
const RAISED: &str = "raise_exception: ";

/// A compiled chat template and the special tokens it is rendered with.
pub(crate) struct ChatTemplate {
    source: String,
    /// The environment holding the compiled template, or why it does not compile.
    env: std::result::Result<Environment<'static>, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("chars", &self.source.len()).field("compiles", &self.env.is_ok()).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. A template that does not compile is kept with its error, which
    /// [`ChatTemplate::render`] returns: a tokenizer stays usable without its template.
    pub(crate) fn new(source: String) -> ChatTemplate {
        let env = environment(&source).map_err(|e| describe(&e, &source, &BTreeSet::new()));
        ChatTemplate { source, env }
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` with `add_generation_prompt` and the named special tokens
    /// (`("bos_token", "<s>")`, ...).
    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special_tokens: &[(String, String)],
    ) -> Result<String> {
        let env = self.env.as_ref().map_err(|e| Error::InvalidArgument(e.clone()))?;
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::InvalidArgument(describe(&e, &self.source, &BTreeSet::new())))?;
        let messages: Vec<Value> = messages.iter().map(|m| Value::from_object(MessageValue(m.clone()))).collect();
        let mut context: Vec<(String, Value)> = vec![
            ("messages".into(), Value::from(messages)),
            ("tools".into(), Value::from(())),
            ("documents".into(), Value::from(())),
            ("add_generation_prompt".into(), Value::from(add_generation_prompt)),
        ];
        for (name, token) in special_tokens {
            context.push((name.clone(), Value::from(token.as_str())));
        }
        let given: BTreeSet<String> = context.iter().map(|(k, _)| k.clone()).collect();
        let context = Value::from_object(Context(context));
        template.render(context).map_err(|e| {
            let mut missing = BTreeSet::new();
            if e.kind() == ErrorKind::UndefinedError {
                for name in template.undeclared_variables(false) {
                    if !given.contains(&name) && env.globals().all(|(g, _)| g != name.as_str()) {
                        missing.insert(name);
                    }
                }
            }
            Error::InvalidArgument(describe(&e, &self.source, &missing))
        })
    }
}

/// The render context: a map in insertion order.
#[derive(Debug)]
struct Context(Vec<(String, Value)>);

impl Object for Context {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }
    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let keys: Vec<Value> = self.0.iter().map(|(k, _)| Value::from(k.as_str())).collect();
        Enumerator::Iter(Box::new(keys.into_iter()))
    }
}

/// A message naming what went wrong and where.
fn describe(e: &minijinja::Error, source: &str, missing: &BTreeSet<String>) -> String {
    let detail = e.detail().unwrap_or_default();
    if let Some(message) = detail.strip_prefix(RAISED) {
        return format!("chat template raised an exception: {message}");
    }
    let mut out = format!("chat template: {}", e.kind());
    if !detail.is_empty() {
        let _ = write!(out, ": {detail}");
    }
    if let Some(line) = e.line() {
        let text = source.lines().nth(line.saturating_sub(1)).unwrap_or_default().trim();
        let _ = write!(out, " (line {line}: {text:?})");
    }
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(String::as_str).collect();
        let _ = write!(out, "; the template reads undefined variable(s) {}", names.join(", "));
    }
    out
}

/// transformers' environment (see the module docs), with the template compiled in it.
fn environment(source: &str) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?;
    env.set_syntax(syntax);
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", |message: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
    });
    env.add_function("strftime_now", |format: String| -> std::result::Result<Value, minijinja::Error> {
        strftime_now(&format).map(Value::from).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
    });
    env.add_template_owned(TEMPLATE_NAME, without_generation_tags(source))?;
    Ok(env)
}

/// transformers' `{% generation %}...{% endgeneration %}` marks the assistant's text for its
/// assistant-token mask and renders its body unchanged: here it becomes `{% if true %}` ...
/// `{% endif %}`, whitespace control kept.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start);
        out.push_str(before);
        let body = &tag[2..];
        let marker = body.len() - body.trim_start_matches(['-', '+']).len();
        let trimmed = &body[marker..];
        let space = trimmed.len() - trimmed.trim_start().len();
        let word_at = &trimmed[space..];
        let word_len = word_at.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(word_at.len());
        let replacement = match &word_at[..word_len] {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        let head = 2 + marker + space;
        out.push_str(&tag[..head]);
        if let Some(r) = replacement {
            out.push_str(r);
            rest = &tag[head + word_len..];
        } else {
            rest = &tag[head..];
        }
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------
// tojson: Python's json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)

fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.is_integer() => Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize)),
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                ));
            }
        },
    };
    let (item_sep, key_sep) = match separators.filter(|v| !v.is_none()) {
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap_or_default().to_string(), b.as_str().unwrap_or_default().to_string())
                }
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ));
                }
            }
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let options = JsonOptions {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, value, &options, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Deeper than this is refused (the writer recurses once per level).
const MAX_JSON_DEPTH: usize = 256;

fn write_json(
    out: &mut String,
    value: &Value,
    o: &JsonOptions,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => out.push_str(&python_float(f64::try_from(value.clone()).unwrap_or(f64::NAN))),
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), o, depth, |out, i| write_json(out, &items[i], o, depth + 1))?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            let mut names = Vec::with_capacity(keys.len());
            for key in &keys {
                names.push(match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
                    ValueKind::None => "null".to_string(),
                    ValueKind::Number if key.is_integer() => key.to_string(),
                    ValueKind::Number => python_float(f64::try_from(key.clone()).unwrap_or(f64::NAN)),
                    kind => {
                        return Err(minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
                        ));
                    }
                });
            }
            let mut order: Vec<usize> = (0..keys.len()).collect();
            if o.sort_keys {
                order.sort_by(|&a, &b| names[a].cmp(&names[b]));
            }
            let values: Vec<Value> = keys.iter().map(|k| value.get_item(k)).collect::<std::result::Result<_, _>>()?;
            keys.clear();
            write_container(out, '{', '}', order.len(), o, depth, |out, i| {
                let at = order[i];
                write_json_str(out, &names[at], o.ensure_ascii);
                out.push_str(&o.key_sep);
                write_json(out, &values[at], o, depth + 1)
            })?;
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    o: &JsonOptions,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        if let Some(indent) = &o.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        item(out, i)?;
    }
    if let Some(indent) = &o.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// A JSON string as Python's json module writes it.
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)` (shortest round-trip digits; scientific below 1e-4 and from 1e16),
/// and json's `NaN` / `Infinity`.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "d.ddde-5".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let mantissa = if rest.is_empty() { first.to_string() } else { format!("{first}.{rest}") };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{esign}{:02}", exp.abs())
    }
}

// ---------------------------------------------------------------------------------------
// strftime_now

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// The current time (UTC) formatted with C's `strftime` directives: `%Y %y %m %B %b %d %e %j
/// %A %a %H %I %M %S %p %%`, and glibc's `%-d` style for no padding.
fn strftime_now(format: &str) -> std::result::Result<String, String> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| format!("strftime_now: the clock is before 1970: {e}"))?
        .as_secs() as i64;
    strftime(format, secs)
}

/// `format` at `secs` seconds after the Unix epoch, UTC.
fn strftime(format: &str, secs: i64) -> std::result::Result<String, String> {
    let days = secs.div_euclid(86_400);
    let in_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (in_day / 3600, in_day / 60 % 60, in_day % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next().ok_or("strftime_now: the format ends with a lone %")?;
        let unpadded = spec == '-';
        if unpadded {
            spec = chars.next().ok_or("strftime_now: the format ends with %-")?;
        }
        let num = |v: i64, width: usize| if unpadded { v.to_string() } else { format!("{v:0width$}") };
        match spec {
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&num(year.rem_euclid(100), 2)),
            'm' => out.push_str(&num(month, 2)),
            'B' => out.push_str(MONTHS[(month - 1) as usize]),
            'b' | 'h' => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            'd' => out.push_str(&num(day, 2)),
            'e' => out.push_str(&if unpadded { day.to_string() } else { format!("{day:>2}") }),
            'j' => out.push_str(&num(yday, 3)),
            'A' => out.push_str(WEEKDAYS[weekday]),
            'a' => out.push_str(&WEEKDAYS[weekday][..3]),
            'H' => out.push_str(&num(hour, 2)),
            'I' => out.push_str(&num(hour12, 2)),
            'M' => out.push_str(&num(minute, 2)),
            'S' => out.push_str(&num(second, 2)),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            '%' => out.push('%'),
            other => return Err(format!("strftime_now: unsupported directive %{other} in {format:?}")),
        }
    }
    Ok(out)
}

/// (year, month 1..=12, day 1..=31) of `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (123456.0, "123456.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.2345e-7, "1.2345e-07"),
            (12.375, "12.375"),
        ] {
            assert_eq!(python_float(x), want, "{x}");
        }
    }

    #[test]
    fn strftime_matches_python() {
        // python3 -c "import datetime; print(datetime.datetime.fromtimestamp(1709251199, datetime.timezone.utc)
        //   .strftime('%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I %p %-d %e'))"
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I %p %-d %e %%", 1_709_251_199).unwrap(),
            "2024-02-29 23:59:59 Thu Thursday Feb February 060 24 11 PM 29 29 %"
        );
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert!(strftime("%Q", 0).is_err());
        assert!(strftime("%", 0).is_err());
    }

    #[test]
    fn generation_tags_become_ifs() {
        assert_eq!(
            without_generation_tags("a{% generation %}b{%- endgeneration -%}c{% if x %}{% endif %}"),
            "a{% if true %}b{%- endif -%}c{% if x %}{% endif %}"
        );
        assert_eq!(without_generation_tags("{% generations %}"), "{% generations %}");
        assert_eq!(without_generation_tags("{%"), "{%");
    }
}
