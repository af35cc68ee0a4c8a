//! The tokenizer and chat templates against transformers (fixtures written by
//! tests/fixtures/make_tokenizer.py): ids, decodings and chat renderings of the real SmolLM2
//! GGUF and of a tiny tokenizer.json; round trips; streaming; bad input.

mod common;

use common::gguf::{GgufBuilder, T_ARRAY, T_BOOL, T_STRING, array, kv, kv_str, kv_u32, string};
use kiln::model::{ChatMessage, Tokenizer};
use kiln::{Error, GgufFile};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load_json(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The SmolLM2 tokenizer from the cached default model, or `None` (with the reason printed)
/// when the model is not cached; with `CI=true` a missing model is a failure.
fn smollm2() -> Option<Tokenizer> {
    let Some(path) = kiln::model::cached_default_model() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but the default model is not cached: CI fetches it before the tests (see README)");
        }
        println!("SKIP: the default model (SmolLM2 GGUF) is not cached; run the README's fetch step first");
        return None;
    };
    let gguf = GgufFile::open(&path).expect("open the default model");
    let start = Instant::now();
    let tokenizer = Tokenizer::from_gguf(&gguf).expect("tokenizer from GGUF");
    println!("tokenizer from {} built in {:?}", path.display(), start.elapsed());
    Some(tokenizer)
}

fn tiny() -> Tokenizer {
    Tokenizer::from_file(&fixtures().join("tiny_tokenizer/tokenizer.json")).expect("tiny tokenizer.json")
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn messages_of(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .expect("messages")
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

/// Ids and decodings equal transformers' for every text of the fixture.
fn check_cases(tokenizer: &Tokenizer, expected: &Value) {
    assert_eq!(tokenizer.vocab_size() as u64, expected["vocab_size"].as_u64().unwrap(), "vocab size");
    assert_eq!(tokenizer.bos_id().map(u64::from), expected["bos_id"].as_u64(), "bos id");
    assert_eq!(tokenizer.eos_ids().first().map(|&i| u64::from(i)), expected["eos_id"].as_u64(), "eos id");
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 25);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = tokenizer.encode(text, true).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "ids of {text:?}");
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), case["decoded"].as_str().unwrap(), "decode of {text:?}");
        assert_eq!(
            tokenizer.decode(&ids, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode (skip special) of {text:?}"
        );
    }
}

fn check_chats(tokenizer: &Tokenizer, expected: &Value) {
    let chats = expected["chats"].as_array().unwrap();
    assert!(chats.len() >= 8);
    for chat in chats {
        let messages = messages_of(&chat["messages"]);
        let add = chat["add_generation_prompt"].as_bool().unwrap();
        let rendered = tokenizer.apply_chat_template(&messages, add).unwrap();
        assert_eq!(rendered, chat["rendered"].as_str().unwrap(), "{messages:?}, add_generation_prompt={add}");
    }
}

/// decode(encode(text)) gives the text back.
fn check_round_trip(tokenizer: &Tokenizer, expected: &Value) {
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text, "round trip of {text:?}");
    }
}

/// Feeding ids one by one gives pieces that concatenate to the whole decoding; each piece is
/// whole characters, and some id completes no character (a multi-byte character split).
fn check_stream(tokenizer: &Tokenizer, texts: &[&str]) {
    let mut held_back = 0;
    for &text in texts {
        for skip in [false, true] {
            let ids = tokenizer.encode(text, true).unwrap();
            let mut stream = tokenizer.decoder_stream(skip);
            let mut out = String::new();
            for &id in &ids {
                match stream.step(id).unwrap() {
                    Some(piece) => {
                        assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} of {text:?} has a broken character");
                        out.push_str(&piece);
                    }
                    None => held_back += 1,
                }
            }
            if let Some(rest) = stream.finish().unwrap() {
                out.push_str(&rest);
            }
            assert_eq!(out, tokenizer.decode(&ids, skip).unwrap(), "stream of {text:?} (skip special {skip})");
        }
    }
    assert!(held_back > 0, "no id ended inside a character: the multi-byte case was not exercised");

    // An incomplete character at the very end comes out of finish() as decode gives it.
    let ids = tokenizer.encode("😀", false).unwrap();
    assert!(ids.len() > 1, "the emoji should take several byte tokens: {ids:?}");
    let mut stream = tokenizer.decoder_stream(false);
    let mut out = String::new();
    for &id in &ids[..ids.len() - 1] {
        out.push_str(&stream.step(id).unwrap().unwrap_or_default());
    }
    out.push_str(&stream.finish().unwrap().unwrap_or_default());
    assert_eq!(out, tokenizer.decode(&ids[..ids.len() - 1], false).unwrap());
}

const STREAM_TEXTS: &[&str] = &[
    "emoji: 😀🎉👍🏽 family 👨‍👩‍👧",
    "CJK: 中文字符 日本語のテキスト 한국어",
    "combining: e\u{301} a\u{308} and café",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "plain ascii text with spaces  and\ttabs\n",
];

fn texts(expected: &Value) -> Vec<&str> {
    expected["cases"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect()
}

#[test]
fn gguf_ids_match_transformers() {
    let Some(tokenizer) = smollm2() else { return };
    let expected = load_json("tokenizer_smollm2.json");
    check_cases(&tokenizer, &expected);
    for (name, id) in expected["special_tokens"].as_object().unwrap() {
        let token = tokenizer.special_tokens().iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());
        let token = token.unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(tokenizer.token_to_id(&token).map(u64::from), id.as_u64(), "{name} = {token:?}");
    }
    assert_eq!(tokenizer.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tokenizer.eos_ids(), &[2]);
}

#[test]
fn gguf_chat_template_matches_transformers() {
    let Some(tokenizer) = smollm2() else { return };
    let expected = load_json("tokenizer_smollm2.json");
    assert!(tokenizer.chat_template().unwrap().contains("<|im_start|>"));
    check_chats(&tokenizer, &expected);
}

#[test]
fn gguf_round_trips_and_streams() {
    let Some(tokenizer) = smollm2() else { return };
    let expected = load_json("tokenizer_smollm2.json");
    check_round_trip(&tokenizer, &expected);
    let mut all = texts(&expected);
    all.extend_from_slice(STREAM_TEXTS);
    check_stream(&tokenizer, &all);
}

/// Every token's own decoding, encoded: the same ids as transformers gives, for the whole
/// vocabulary (a rolling hash of the id lists, as the fixture script computes it); and fast.
#[test]
fn gguf_whole_vocabulary_matches_transformers() {
    let Some(tokenizer) = smollm2() else { return };
    let expected = &load_json("tokenizer_smollm2.json")["vocab_roundtrip"];
    const MODULUS: u128 = (1 << 61) - 1;
    let start = Instant::now();
    let (mut hash, mut total) = (0u128, 0u64);
    for id in 0..tokenizer.vocab_size() as u32 {
        let text = tokenizer.decode(&[id], false).unwrap();
        let ids = tokenizer.encode(&text, false).unwrap();
        for t in &ids {
            hash = (hash * 1_000_003 + u128::from(*t) + 1) % MODULUS;
        }
        hash = (hash * 1_000_003) % MODULUS;
        total += ids.len() as u64;
    }
    let elapsed = start.elapsed();
    println!("decoded and encoded all {} tokens in {elapsed:?}", tokenizer.vocab_size());
    assert_eq!(total, expected["total_ids"].as_u64().unwrap());
    assert_eq!(hash as u64, expected["hash"].as_u64().unwrap());
    assert!(elapsed.as_secs_f64() < 20.0, "the whole vocabulary took {elapsed:?}");
}

#[test]
fn gguf_builds_fast() {
    let Some(path) = kiln::model::cached_default_model() else { return };
    let gguf = GgufFile::open(&path).unwrap();
    let _warm = Tokenizer::from_gguf(&gguf).unwrap();
    let start = Instant::now();
    let _tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let elapsed = start.elapsed();
    println!("Tokenizer::from_gguf: {elapsed:?}");
    // Well under a second in release; a debug build is allowed more.
    let limit = if cfg!(debug_assertions) { 10.0 } else { 1.0 };
    assert!(elapsed.as_secs_f64() < limit, "building the tokenizer took {elapsed:?}");
}

#[test]
fn tokenizer_json_ids_match_transformers() {
    let tokenizer = tiny();
    let expected = load_json("tiny_tokenizer.json");
    check_cases(&tokenizer, &expected);
    // The post-processor of the tokenizer.json adds BOS; without special tokens it does not.
    assert_eq!(tokenizer.encode("Hello", true).unwrap()[0], 0);
    assert_ne!(tokenizer.encode("Hello", false).unwrap()[0], 0);
}

#[test]
fn tokenizer_json_chat_template_matches_transformers() {
    let tokenizer = tiny();
    let expected = load_json("tiny_tokenizer.json");
    assert!(tokenizer.chat_template().unwrap().contains("namespace"), "the \"default\" template of the list");
    check_chats(&tokenizer, &expected);

    let error = &expected["error_chat"];
    let err = tokenizer.apply_chat_template(&messages_of(&error["messages"]), false).unwrap_err();
    let want = error["error"].as_str().unwrap();
    assert!(
        matches!(err, Error::InvalidArgument(_)) && err.to_string().contains(want),
        "{err} should contain {want:?}"
    );
}

#[test]
fn tokenizer_json_round_trips_and_streams() {
    let tokenizer = tiny();
    let expected = load_json("tiny_tokenizer.json");
    check_round_trip(&tokenizer, &expected);
    let mut all = texts(&expected);
    all.extend_from_slice(STREAM_TEXTS);
    check_stream(&tokenizer, &all);
}

/// A directory holding `files` (name, contents) beside a copy of the tiny tokenizer.json.
fn scratch_dir(tag: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-tokenizer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures().join("tiny_tokenizer/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    for (name, contents) in files {
        std::fs::write(dir.join(name), contents).unwrap();
    }
    dir
}

/// Templates using what real chat templates use, each written into a tokenizer_config.json:
/// rendered as transformers' `render_jinja_template` renders them.
#[test]
fn chat_template_features_match_transformers() {
    let expected = &load_json("tiny_tokenizer.json")["template_cases"];
    let messages = messages_of(&expected["messages"]);
    let mut config = expected["special_tokens"].clone();
    for (i, case) in expected["cases"].as_array().unwrap().iter().enumerate() {
        let template = case["template"].as_str().unwrap();
        config["chat_template"] = Value::from(template);
        let dir = scratch_dir(&format!("feature{i}"), &[("tokenizer_config.json", &config.to_string())]);
        let tokenizer = Tokenizer::from_hf_dir(&dir).unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = tokenizer.apply_chat_template(&messages, add).unwrap_or_else(|e| panic!("{template:?}: {e}"));
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{template:?}, add_generation_prompt={add}");
    }
}

#[test]
fn chat_template_sources() {
    // chat_template.jinja wins over the config's; the named tokens, strings or token objects,
    // give the special ids.
    let dir = scratch_dir(
        "jinja",
        &[
            (
                "tokenizer_config.json",
                r#"{"bos_token": "<|user|>", "eos_token": {"content": "<|assistant|>"}, "chat_template": "config"}"#,
            ),
            ("chat_template.jinja", "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"),
        ],
    );
    let tokenizer = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(tokenizer.bos_id(), Some(1));
    assert_eq!(tokenizer.eos_ids(), &[2]);
    assert_eq!(tokenizer.apply_chat_template(&[ChatMessage::user("hi")], true).unwrap(), "<|user|>hi<|assistant|>");
}

#[test]
fn chat_template_errors() {
    let cases: &[(&str, &str)] = &[
        ("{{ messages[0].content }}{{ not_given }}", "not_given"),
        ("{% for x in also_missing %}{% endfor %}", "also_missing"),
        ("{{ raise_exception('no system role allowed') }}", "no system role allowed"),
        ("{% if %}", "syntax"),
        ("{{ messages | tojson(indent=[1]) }}", "indent"),
        ("{{ strftime_now('%Q') }}", "%Q"),
    ];
    for (i, (template, needle)) in cases.iter().enumerate() {
        let config = serde_json::json!({"chat_template": template}).to_string();
        let dir = scratch_dir(&format!("err{i}"), &[("tokenizer_config.json", &config)]);
        let tokenizer =
            Tokenizer::from_hf_dir(&dir).expect("a bad template is an error when rendered, not when loaded");
        let err = tokenizer.apply_chat_template(&[ChatMessage::user("hi")], true).unwrap_err();
        println!("{template:?}: {err}");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err} should name {needle:?}");
    }
    // No messages; no template; a list without "default".
    let tokenizer = tiny();
    assert!(tokenizer.apply_chat_template(&[], true).is_err());
    let dir = scratch_dir("none", &[]);
    let err = Tokenizer::from_hf_dir(&dir).unwrap().apply_chat_template(&[ChatMessage::user("hi")], true).unwrap_err();
    assert!(err.to_string().contains("no chat template"), "{err}");
    let dir = scratch_dir(
        "nodefault",
        &[("tokenizer_config.json", r#"{"chat_template": [{"name": "tool_use", "template": "x"}]}"#)],
    );
    let err = Tokenizer::from_hf_dir(&dir).unwrap().apply_chat_template(&[ChatMessage::user("hi")], true).unwrap_err();
    assert!(err.to_string().contains("default"), "{err}");
}

#[test]
fn bad_files_are_errors_naming_them() {
    let missing = fixtures().join("no_such_dir/tokenizer.json");
    let err = Tokenizer::from_file(&missing).unwrap_err();
    assert!(matches!(err, Error::Io(_)) && err.to_string().contains("no_such_dir"), "{err}");

    let dir = scratch_dir("corrupt", &[]);
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": \"1.0\", \"model\": ").unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    std::fs::write(dir.join("tokenizer.json"), "[1, 2, 3]").unwrap();
    assert!(Tokenizer::from_hf_dir(&dir).unwrap_err().to_string().contains("tokenizer.json"));

    let dir = scratch_dir("badconfig", &[("tokenizer_config.json", "{not json")]);
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    let dir = scratch_dir("badconfig2", &[("tokenizer_config.json", r#"{"chat_template": 3}"#)]);
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("chat_template"), "{err}");
    let dir = scratch_dir("badconfig3", &[("tokenizer_config.json", r#"{"bos_token": 7}"#)]);
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("bos_token"), "{err}");
    let dir = scratch_dir("badgen", &[("generation_config.json", r#"{"eos_token_id": [2, 99999]}"#)]);
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("99999") && err.to_string().contains("generation_config.json"), "{err}");
}

#[test]
fn ids_past_the_vocabulary_are_errors() {
    let tokenizer = tiny();
    let vocab = tokenizer.vocab_size() as u32;
    for ids in [vec![vocab], vec![5, 6, u32::MAX], vec![vocab + 1000]] {
        let err = tokenizer.decode(&ids, false).unwrap_err();
        let bad = ids.iter().find(|&&i| i >= vocab).unwrap();
        assert!(matches!(err, Error::InvalidArgument(_)) && err.to_string().contains(&bad.to_string()), "{err}");
    }
    let mut stream = tokenizer.decoder_stream(false);
    assert!(stream.step(vocab).is_err());
    // The stream goes on after the bad id.
    let ids = tokenizer.encode("hello world", false).unwrap();
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&stream.step(id).unwrap().unwrap_or_default());
    }
    assert_eq!(out, "hello world");
    assert_eq!(tokenizer.decode(&[], false).unwrap(), "");
    assert_eq!(tokenizer.encode("", true).unwrap(), vec![0]);
}

/// A GGUF holding only tokenizer metadata: `tokens` (type 3 for those in `control`), `merges`,
/// and `extra` key-value pairs.
fn tokenizer_gguf(
    tag: &str,
    model: &str,
    tokens: &[&str],
    control: &[&str],
    merges: &[&str],
    extra: Vec<Vec<u8>>,
) -> GgufFile {
    let strings = |items: &[&str]| items.iter().flat_map(|t| string(t.as_bytes())).collect::<Vec<u8>>();
    let types: Vec<u8> = tokens.iter().flat_map(|t| if control.contains(t) { 3i32 } else { 1 }.to_le_bytes()).collect();
    let mut builder = GgufBuilder::new()
        .kv(kv_str("tokenizer.ggml.model", model))
        .kv(kv("tokenizer.ggml.tokens", T_ARRAY, &array(T_STRING, tokens.len() as u64, &strings(tokens))))
        .kv(kv("tokenizer.ggml.token_type", T_ARRAY, &array(5, tokens.len() as u64, &types)))
        .kv(kv("tokenizer.ggml.merges", T_ARRAY, &array(T_STRING, merges.len() as u64, &strings(merges))));
    for e in extra {
        builder = builder.kv(e);
    }
    let path = std::env::temp_dir().join(format!("kiln-tokenizer-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&path, builder.bytes()).unwrap();
    GgufFile::open(&path).unwrap()
}

#[test]
fn gguf_small_byte_level_bpe() {
    // "a b" holds a space, so it is re-spelled "aĠb" (GPT-2's byte alphabet), as the merges spell it.
    let tokens = ["a", "b", "Ġ", "ab", "aĠ", "a b", "<s>", "</s>"];
    let merges = ["a b", "a Ġ", "aĠ b"];
    let gguf = tokenizer_gguf(
        "small",
        "gpt2",
        &tokens,
        &["<s>", "</s>"],
        &merges,
        vec![
            kv_u32("tokenizer.ggml.bos_token_id", 6),
            kv_u32("tokenizer.ggml.eos_token_id", 7),
            kv("tokenizer.ggml.add_bos_token", T_BOOL, &[1]),
            kv_str("tokenizer.chat_template", "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"),
        ],
    );
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(tokenizer.vocab_size(), 8);
    assert_eq!(tokenizer.encode("ab", true).unwrap(), vec![6, 3]);
    assert_eq!(tokenizer.encode("ab", false).unwrap(), vec![3]);
    assert_eq!(tokenizer.encode("a b</s>", false).unwrap(), vec![0, 2, 1, 7], "GPT-2's split puts the space with b");
    assert_eq!(tokenizer.decode(&[6, 5, 7], true).unwrap(), "a b");
    assert_eq!(tokenizer.decode(&[6, 5, 7], false).unwrap(), "<s>a b</s>");
    assert_eq!((tokenizer.bos_id(), tokenizer.eos_ids()), (Some(6), &[7][..]));
    assert_eq!(tokenizer.apply_chat_template(&[ChatMessage::user("x")], false).unwrap(), "<s>x</s>");
}

#[test]
fn gguf_bad_metadata_is_an_error() {
    // A GGUF of the crate's own fixtures has no tokenizer: the error names the key.
    let gguf = GgufFile::open(fixtures().join("kiln.gguf")).unwrap();
    let err = Tokenizer::from_gguf(&gguf).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.model"), "{err}");

    let tokens = ["a", "b", "ab"];
    let cases: Vec<(&str, GgufFile, &str)> = vec![
        ("sentencepiece", tokenizer_gguf("spm", "llama", &tokens, &[], &["a b"], vec![]), "\"llama\""),
        ("merge of unknown tokens", tokenizer_gguf("m1", "gpt2", &tokens, &[], &["a c"], vec![]), "merges"),
        ("merge of three", tokenizer_gguf("m2", "gpt2", &tokens, &[], &["a b c"], vec![]), "merges[0]"),
        (
            "bos past the tokens",
            tokenizer_gguf("bos", "gpt2", &tokens, &[], &["a b"], vec![kv_u32("tokenizer.ggml.bos_token_id", 3)]),
            "tokenizer.ggml.bos_token_id",
        ),
        (
            "mistyped flag",
            tokenizer_gguf("flag", "gpt2", &tokens, &[], &["a b"], vec![kv_u32("tokenizer.ggml.add_bos_token", 1)]),
            "tokenizer.ggml.add_bos_token",
        ),
        (
            "mistyped template",
            tokenizer_gguf("tmpl", "gpt2", &tokens, &[], &["a b"], vec![kv_u32("tokenizer.chat_template", 1)]),
            "tokenizer.chat_template",
        ),
    ];
    for (what, gguf, needle) in cases {
        let err = Tokenizer::from_gguf(&gguf).unwrap_err();
        println!("{what}: {err}");
        assert!(err.to_string().contains(needle), "{what}: {err} should name {needle}");
        assert!(err.to_string().contains("kiln-tokenizer-"), "{what}: {err} should name the file");
    }
    let err = Tokenizer::from_gguf(&tokenizer_gguf("spm2", "llama", &tokens, &[], &[], vec![])).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
}
