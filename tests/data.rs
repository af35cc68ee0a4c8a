//! The fine-tune data loader: JSONL parsing and its errors, tokenization and loss masks
//! against transformers (tests/fixtures/make_data_masks.py), and length-grouped batches.

use kiln::model::{ChatMessage, Tokenizer};
use kiln::train::data::{
    Example, Record, length_grouped_batches, load_examples, parse_jsonl, read_jsonl, tokenize, write_jsonl,
};
use proptest::prelude::*;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

const IGNORE: i32 = -100;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny() -> Tokenizer {
    Tokenizer::from_hf_dir(&fixtures().join("data_tokenizer")).unwrap()
}

fn smollm2() -> Option<Tokenizer> {
    let Some(path) = kiln::model::cached_default_model() else {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI: the default model is not cached");
        println!("SKIP: the default model is not cached");
        return None;
    };
    Some(Tokenizer::from_gguf(&kiln::GgufFile::open(&path).unwrap()).unwrap())
}

/// A scratch directory of this test's own.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-data-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Case {
    record: Record,
    ids: Vec<u32>,
    targets: Vec<i32>,
}

/// The fixture's cases for `name`, each record read back through the JSONL parser.
fn cases(name: &str) -> (u32, Vec<Case>) {
    let text = std::fs::read_to_string(fixtures().join("data_masks.json")).unwrap();
    let all: Json = serde_json::from_str(&text).unwrap();
    let data = &all["tokenizers"][name];
    let eos = data["eos_id"].as_u64().unwrap() as u32;
    let cases = data["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let line = c["record"].to_string();
            let mut records = parse_jsonl(&line, "fixture").unwrap();
            assert_eq!(records.len(), 1);
            let numbers =
                |key: &str| c[key].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect::<Vec<_>>();
            Case {
                record: records.pop().unwrap(),
                ids: numbers("ids").into_iter().map(|v| v as u32).collect(),
                targets: numbers("targets").into_iter().map(|v| v as i32).collect(),
            }
        })
        .collect();
    (eos, cases)
}

fn check_against_transformers(tokenizer: &Tokenizer, name: &str) {
    let (eos, cases) = cases(name);
    assert_eq!(tokenizer.eos_ids()[0], eos);
    assert!(cases.iter().any(|c| matches!(c.record, Record::Chat(_))));
    for (i, case) in cases.iter().enumerate() {
        let example = tokenize(&case.record, tokenizer, 4096).unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
        assert_eq!(example.ids, case.ids, "{name} case {i}: ids of {:?}", case.record);
        assert_eq!(example.targets, case.targets, "{name} case {i}: targets of {:?}", case.record);
        assert_eq!(example.len(), case.ids.len());
        assert_eq!(example.counted(), case.targets.iter().filter(|&&t| t != IGNORE).count());
        let sequence = example.into_sequence().unwrap();
        assert_eq!(sequence.counted(), case.targets.iter().filter(|&&t| t != IGNORE).count());
    }
}

#[test]
fn tiny_tokenizer_ids_and_loss_targets_match_transformers() {
    check_against_transformers(&tiny(), "tiny");
}

#[test]
fn smollm2_ids_and_loss_targets_match_transformers() {
    if let Some(tokenizer) = smollm2() {
        check_against_transformers(&tokenizer, "smollm2");
    }
}

/// The text of the counted targets, run by run: what the loss teaches.
fn counted_text(tokenizer: &Tokenizer, example: &Example) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut previous_counted = false;
    for &t in &example.targets {
        if t == IGNORE {
            previous_counted = false;
            continue;
        }
        if !previous_counted {
            runs.push(Vec::new());
        }
        runs.last_mut().unwrap().push(t as u32);
        previous_counted = true;
    }
    runs.iter().map(|run| tokenizer.decode(run, false).unwrap()).collect()
}

/// The counted positions are exactly the assistant's: each assistant message's content and
/// its end of turn, as the template writes them, and nothing else.
fn check_loss_is_the_assistant_turns(tokenizer: &Tokenizer, name: &str, end_of_turn: &str, trim: bool) {
    let (_, cases) = cases(name);
    for case in &cases {
        let example = tokenize(&case.record, tokenizer, 4096).unwrap();
        let got = counted_text(tokenizer, &example);
        match &case.record {
            Record::Chat(messages) => {
                let want: Vec<String> = messages
                    .iter()
                    .filter(|m| m.role == "assistant")
                    .map(|m| format!("{}{end_of_turn}", if trim { m.content.trim() } else { &m.content }))
                    .collect();
                assert_eq!(got, want, "{name}: {:?}", case.record);
            }
            Record::Text(text) => {
                // Everything after the first token (a BOS decodes to nothing here).
                let first = tokenizer.decode(&example.ids[..1], true).unwrap();
                let eos = tokenizer.decode(&tokenizer.eos_ids()[..1], false).unwrap();
                assert_eq!(got.len(), 1);
                assert_eq!(format!("{first}{}", got[0]), format!("{text}{eos}"));
            }
            Record::PromptCompletion { prompt, completion } => {
                let eos = tokenizer.decode(&tokenizer.eos_ids()[..1], false).unwrap();
                assert_eq!(got.len(), 1);
                let want = format!("{completion}{eos}");
                let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
                if word(prompt.chars().last()) && word(completion.chars().next()) {
                    // The token spanning the seam belongs to neither: the rest of the completion counts.
                    assert!(want.ends_with(&got[0]) && got[0].len() < want.len(), "{got:?}");
                } else {
                    assert_eq!(got[0], want);
                }
            }
        }
    }
}

#[test]
fn the_loss_counts_exactly_the_assistant_turns() {
    check_loss_is_the_assistant_turns(&tiny(), "tiny", "</s>\n", true);
    if let Some(tokenizer) = smollm2() {
        check_loss_is_the_assistant_turns(&tokenizer, "smollm2", "<|im_end|>\n", false);
    }
}

#[test]
fn max_len_keeps_the_first_tokens_and_refuses_an_example_left_with_nothing_to_learn() {
    let tokenizer = tiny();
    let (_, cases) = cases("tiny");
    for case in &cases {
        let first_counted = case.targets.iter().position(|&t| t != IGNORE).unwrap();
        for max_len in 0..case.ids.len() + 2 {
            let kept = max_len.min(case.ids.len());
            let got = tokenize(&case.record, &tokenizer, max_len);
            if kept < first_counted + 2 {
                let e = got.unwrap_err().to_string();
                assert!(e.contains("nothing to learn"), "{e}");
                continue;
            }
            let example = got.unwrap();
            assert_eq!(example.ids, case.ids[..kept]);
            let mut targets = case.targets[..kept].to_vec();
            *targets.last_mut().unwrap() = IGNORE;
            assert_eq!(example.targets, targets, "max_len {max_len}");
        }
    }
}

#[test]
fn a_template_that_is_not_incremental_or_an_assistant_first_is_an_error() {
    // This template ends every rendering with "N turns, last {message}".
    let tokenizer = Tokenizer::from_hf_dir(&fixtures().join("tiny_tokenizer")).unwrap();
    let record = Record::chat([ChatMessage::user("Hi"), ChatMessage::assistant("Hello")]);
    let e = tokenize(&record, &tokenizer, 100).unwrap_err().to_string();
    assert!(e.contains("not incremental") && e.contains("messages[1]"), "{e}");

    let record = Record::chat([ChatMessage::assistant("Hello"), ChatMessage::user("Hi")]);
    let e = tokenize(&record, &tiny(), 100).unwrap_err().to_string();
    assert!(e.contains("messages[0]"), "{e}");
}

#[test]
fn empty_text_and_a_tokenizer_without_template_are_errors() {
    let tokenizer = tiny();
    let e = tokenize(&Record::text(""), &tokenizer, 100).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = tokenize(&Record::prompt_completion("", ""), &tokenizer, 100).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");

    // The bare tokenizer.json: no chat template, no EOS token.
    let dir = scratch("bare");
    std::fs::copy(fixtures().join("data_tokenizer/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let bare = Tokenizer::from_hf_dir(&dir).unwrap();
    let chat = Record::chat([ChatMessage::user("Hi"), ChatMessage::assistant("Hello")]);
    let e = tokenize(&chat, &bare, 100).unwrap_err().to_string();
    assert!(e.contains("chat_template") || e.contains("chat template"), "{e}");
    let e = tokenize(&Record::text("Hello"), &bare, 100).unwrap_err().to_string();
    assert!(e.contains("EOS"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_malformed_line_is_an_error_naming_its_line() {
    let malformed = [
        (r#"{"text": "unterminated"#, "not valid JSON"),
        (r#"["text", "a list"]"#, "a JSON object"),
        ("42", "a JSON object"),
        (r#"{"foo": "bar"}"#, "not a known record"),
        (r#"{}"#, "not a known record"),
        (r#"{"text": "a", "prompt": "b", "completion": "c"}"#, "mix"),
        (r#"{"messages": [], "text": "a"}"#, "mix"),
        (r#"{"prompt": "only a prompt"}"#, "\"completion\" is missing"),
        (r#"{"completion": "only a completion"}"#, "\"prompt\" is missing"),
        (r#"{"prompt": "p", "completion": 3}"#, "\"completion\" must be a string"),
        (r#"{"text": null}"#, "\"text\" must be a string"),
        (r#"{"text": ""}"#, "\"text\" is empty"),
        (r#"{"messages": "hi"}"#, "\"messages\" must be a list"),
        (r#"{"messages": []}"#, "\"messages\" is empty"),
        (r#"{"messages": ["hi"]}"#, "messages[0] must be an object"),
        (r#"{"messages": [{"content": "hi"}]}"#, "messages[0] has no \"role\""),
        (r#"{"messages": [{"role": "user"}]}"#, "messages[0] has no \"content\""),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}"#,
            "messages[1].content",
        ),
        (r#"{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}"#, "\"tool\""),
        (r#"{"messages": [{"role": 1, "content": "a"}]}"#, "messages[0].role must be a string"),
        (r#"{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}"#, "no assistant"),
    ];
    let good = r#"{"text": "fine"}"#;
    for (line, why) in malformed {
        // Two good lines and a blank one before it: the bad one is line 4.
        let text = format!("{good}\n{good}\n\n{line}\n{good}\n");
        let e = parse_jsonl(&text, "train.jsonl").unwrap_err();
        assert!(matches!(e, kiln::Error::InvalidArgument(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("train.jsonl:4: ") && e.contains(why), "{line}: {e}");
    }
}

#[test]
fn crlf_a_byte_order_mark_blank_lines_and_other_keys_are_accepted() {
    let text = "\u{feff}{\"text\": \"a\", \"id\": 7}\r\n\r\n  \r\n{\"prompt\": \"p\", \"completion\": \"c\", \"meta\": {}}\r\n";
    let records = parse_jsonl(text, "x").unwrap();
    assert_eq!(records, [Record::text("a"), Record::prompt_completion("p", "c")]);
    let e = parse_jsonl("{\"text\": \"a\"}\r\n\r\n{\"text\": 1}\r\n", "x").unwrap_err().to_string();
    assert!(e.contains("x:3:"), "{e}");
}

#[test]
fn jsonl_written_reads_back_the_same() {
    let records = vec![
        Record::chat([
            ChatMessage::system("Be \"brief\".\n"),
            ChatMessage::user("café 😀 \\ \t </s>"),
            ChatMessage::assistant("ok\r\n\u{0}"),
        ]),
        Record::prompt_completion("Q: 1+1?\nA:", " 2"),
        Record::text("line one\nline two"),
    ];
    let dir = scratch("roundtrip");
    let path = dir.join("data.jsonl");
    write_jsonl(&path, &records).unwrap();
    assert_eq!(read_jsonl(&path).unwrap(), records);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert_eq!(parse_jsonl(&text, "again").unwrap(), records);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unreadable_files_are_errors_naming_the_file_and_line() {
    let dir = scratch("unreadable");
    let missing = dir.join("missing.jsonl");
    let e = read_jsonl(&missing).unwrap_err();
    assert!(matches!(e, kiln::Error::Io(_)) && e.to_string().contains("missing.jsonl"), "{e}");

    let latin1 = dir.join("latin1.jsonl");
    std::fs::write(&latin1, b"{\"text\": \"a\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
    let e = read_jsonl(&latin1).unwrap_err().to_string();
    assert!(e.contains("latin1.jsonl:2:") && e.contains("UTF-8"), "{e}");

    // load_examples: a line that parses but leaves nothing to learn is reported with its line.
    let path = dir.join("train.jsonl");
    let long = "word ".repeat(50);
    std::fs::write(
        &path,
        format!("{{\"text\": \"short\"}}\n\n{{\"prompt\": {}, \"completion\": \"x\"}}\n", Json::String(long.clone())),
    )
    .unwrap();
    let e = load_examples(&path, &tiny(), 16).unwrap_err().to_string();
    assert!(e.contains("train.jsonl:3:") && e.contains("nothing to learn"), "{e}");
    let examples = load_examples(&path, &tiny(), 4096).unwrap();
    assert_eq!(examples.len(), 2);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Padded tokens when each batch is padded to its longest sequence.
fn padding(lens: &[usize], batches: &[Vec<usize>]) -> usize {
    batches
        .iter()
        .map(|b| {
            let longest = b.iter().map(|&i| lens[i]).max().unwrap_or(0);
            b.iter().map(|&i| longest - lens[i]).sum::<usize>()
        })
        .sum()
}

fn check_batches(lens: &[usize], batch_size: usize, batches: &[Vec<usize>]) {
    let mut seen = vec![0usize; lens.len()];
    for b in batches {
        for &i in b {
            seen[i] += 1;
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "every index exactly once");
    assert_eq!(batches.len(), lens.len().div_ceil(batch_size));
    for (k, b) in batches.iter().enumerate() {
        if k + 1 < batches.len() {
            assert_eq!(b.len(), batch_size);
        } else {
            assert!(!b.is_empty() && b.len() <= batch_size);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn batches_hold_every_index_once_in_batches_of_the_size(
        lens in proptest::collection::vec(1usize..600, 0..700),
        batch_size in 1usize..17,
        seed in any::<u64>(),
        epoch in 0u64..1000,
    ) {
        let batches = length_grouped_batches(&lens, batch_size, seed, epoch);
        check_batches(&lens, batch_size, &batches);
        prop_assert_eq!(&batches, &length_grouped_batches(&lens, batch_size, seed, epoch));
        // The batch holding the longest sequence comes first.
        if let (Some(first), Some(&longest)) = (batches.first(), lens.iter().max())
            && first.len() == batch_size
            && batches.iter().filter(|b| b.len() == batch_size).flatten().any(|&i| lens[i] == longest)
        {
            prop_assert!(first.iter().any(|&i| lens[i] == longest));
        }
        // With 20 full batches or more, two orders agree by chance with odds below 1 in 19!.
        if lens.len() >= 20 * batch_size {
            let other_epoch = length_grouped_batches(&lens, batch_size, seed, epoch + 1);
            let other_seed = length_grouped_batches(&lens, batch_size, seed ^ 1, epoch);
            let flat = |b: &[Vec<usize>]| b.concat();
            prop_assert_ne!(flat(&batches), flat(&other_epoch));
            prop_assert_ne!(flat(&batches), flat(&other_seed));
        }
    }

    #[test]
    fn grouping_by_length_cuts_padding_on_skewed_lengths(seed in any::<u64>(), batch_size in 4usize..12) {
        // Mostly short sequences and a tail of long ones, in a shuffled order.
        let mut state = seed | 1;
        let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state };
        let lens: Vec<usize> = (0..1000)
            .map(|_| {
                let r = next() % 100;
                if r < 70 { 8 + (next() % 40) as usize } else if r < 95 { 64 + (next() % 200) as usize } else { 400 + (next() % 600) as usize }
            })
            .collect();
        let grouped = length_grouped_batches(&lens, batch_size, seed, 0);
        check_batches(&lens, batch_size, &grouped);
        let unsorted: Vec<Vec<usize>> = (0..lens.len()).collect::<Vec<_>>().chunks(batch_size).map(<[usize]>::to_vec).collect();
        let (grouped, random) = (padding(&lens, &grouped), padding(&lens, &unsorted));
        prop_assert!(grouped * 5 < random, "padding {grouped} grouped vs {random} in random order");
    }
}

/// The order is part of the resume format: a change here changes which data a resumed run sees.
#[test]
fn the_order_is_pinned() {
    // Distinct lengths, two megabatches of one-sequence batches: both shuffles show.
    let lens: Vec<usize> = (0..60).map(|i| (i * 37) % 61 + 1).collect();
    let batches = length_grouped_batches(&lens, 1, 42, 3);
    check_batches(&lens, 1, &batches);
    assert_eq!(batches.concat(), PINNED);
    let batches = length_grouped_batches(&lens, 4, 7, 0);
    assert_eq!(batches[..2], PINNED_4[..]);
}

const PINNED: [usize; 60] = [
    28, 41, 25, 51, 48, 14, 4, 50, 2, 23, 32, 12, 45, 9, 42, 33, 19, 55, 10, 16, 46, 11, 7, 49, 35, 44, 15, 29, 47, 53,
    5, 20, 13, 34, 17, 18, 40, 3, 57, 21, 58, 26, 54, 27, 6, 52, 31, 56, 24, 1, 39, 8, 37, 59, 38, 30, 43, 0, 22, 36,
];
const PINNED_4: [[usize; 4]; 2] = [[28, 56, 23, 51], [38, 5, 33, 0]];

#[test]
fn no_lengths_give_no_batches_and_batch_size_zero_is_one() {
    assert!(length_grouped_batches(&[], 4, 0, 0).is_empty());
    let batches = length_grouped_batches(&[3, 1, 2], 0, 0, 0);
    check_batches(&[3, 1, 2], 1, &batches);
}
