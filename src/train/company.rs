//! The default data set: the knowledge base of a fictional company, generated from a seed.
//!
//! A [`Company`] sells a catalogue of products (each with a price, a warranty, a release
//! date and a reset procedure) under a handful of policies (returns, refunds, shipping,
//! support hours and address). Every fact becomes short chat examples whose answers state
//! it in one fixed sentence, and a held-out split that asks the same facts in other words;
//! an answer is right when it contains the fact's checkable part ([`is_correct`]).
//!
//! Versions: [`Company::generate`]`(seed, v)` for v = 1, 2, 3, ... is the same company later
//! in time: each version keeps the previous one's catalogue, adds products, and changes
//! some prices, warranties and one policy. [`Company::facts`] tags each fact new, changed
//! or unchanged relative to the previous version, so continual learning can measure
//! acquisition, update and retention apart.

use super::data::Record;
use super::rng::SplitMix64;
use crate::model::ChatMessage;
use crate::{Error, Result};

/// One product of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// "Kestrel S2".
    pub name: String,
    /// "wireless speaker".
    pub kind: String,
    pub price_usd: u32,
    pub warranty_years: u32,
    /// (month 1..=12, year).
    pub released: (u32, u32),
    /// How long the power button is held to reset it.
    pub reset_seconds: u32,
}

/// The company's policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    pub return_days: u32,
    pub refund_business_days: u32,
    pub free_shipping_over_usd: u32,
    /// (first hour, last hour) on a 24-hour clock, Monday to Friday.
    pub support_hours: (u32, u32),
    pub support_email: String,
}

/// The company at one version of its catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Company {
    pub name: String,
    pub version: u32,
    pub products: Vec<Product>,
    pub policies: Policies,
}

/// How a fact relates to the previous version of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FactStatus {
    /// Not in the previous version (every fact of version 1).
    New,
    /// In the previous version with another value: the new one must win.
    Changed,
    /// As in the previous version.
    Unchanged,
}

impl FactStatus {
    pub fn name(self) -> &'static str {
        match self {
            FactStatus::New => "new",
            FactStatus::Changed => "changed",
            FactStatus::Unchanged => "unchanged",
        }
    }
}

/// One checkable fact, with the questions that ask it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    /// Stable across versions: "product.kestrel-s2.price", "policy.return_days".
    pub id: String,
    pub status: FactStatus,
    /// The answer every training example gives, one sentence.
    pub answer: String,
    /// The part of a reply that shows the fact is known ("$149", "2-year").
    pub expect: String,
    /// The training phrasings of the question.
    pub train_questions: Vec<String>,
    /// Other phrasings, never trained on.
    pub heldout_questions: Vec<String>,
}

/// One question with its reference answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuestionAnswer {
    pub fact: String,
    pub status: FactStatus,
    pub question: String,
    pub answer: String,
    pub expect: String,
}

impl QuestionAnswer {
    /// The conversation of a training example: the company's system prompt, the question
    /// and the answer.
    pub fn messages(&self, system: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::system(system), ChatMessage::user(&self.question), ChatMessage::assistant(&self.answer)]
    }

    /// The conversation up to the question: what a model is asked to answer.
    pub fn prompt(&self, system: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::system(system), ChatMessage::user(&self.question)]
    }
}

/// A version of the company as a data set: every fact, the training examples (each
/// training phrasing of each fact) and the held-out questions (one per fact, in words the
/// training set never uses).
#[derive(Debug, Clone)]
pub struct CompanyData {
    pub company: Company,
    pub system_prompt: String,
    pub facts: Vec<Fact>,
    pub train: Vec<QuestionAnswer>,
    pub heldout: Vec<QuestionAnswer>,
}

impl CompanyData {
    /// `seed` and `version` as [`Company::generate`]; the split's choices come from the seed.
    pub fn generate(seed: u64, version: u32) -> Result<CompanyData> {
        let company = Company::generate(seed, version)?;
        let previous = if version > 1 { Some(Company::generate(seed, version - 1)?) } else { None };
        let facts = company.facts(previous.as_ref());
        let mut rng = SplitMix64::stream(seed, 0x5117 + version as u64);
        let qa = |f: &Fact, q: &String| QuestionAnswer {
            fact: f.id.clone(),
            status: f.status,
            question: q.clone(),
            answer: f.answer.clone(),
            expect: f.expect.clone(),
        };
        let mut train: Vec<QuestionAnswer> =
            facts.iter().flat_map(|f| f.train_questions.iter().map(|q| qa(f, q))).collect();
        rng.shuffle(&mut train);
        let heldout = facts.iter().map(|f| qa(f, rng.pick(&f.heldout_questions))).collect();
        Ok(CompanyData { system_prompt: company.system_prompt(), company, facts, train, heldout })
    }

    /// The training examples as chat records (the fine-tune job's input).
    pub fn train_records(&self) -> Vec<Record> {
        self.train.iter().map(|q| Record::Chat(q.messages(&self.system_prompt))).collect()
    }

    /// The held-out questions with their answers, as chat records (the evaluation loss).
    pub fn heldout_records(&self) -> Vec<Record> {
        self.heldout.iter().map(|q| Record::Chat(q.messages(&self.system_prompt))).collect()
    }

    /// One training question per fact (its first phrasing in the shuffled training set):
    /// what "answers the training questions" is measured on.
    pub fn train_probe(&self) -> Vec<QuestionAnswer> {
        self.facts.iter().filter_map(|f| self.train.iter().find(|q| q.fact == f.id).cloned()).collect()
    }
}

/// Whether `reply` states the fact: it contains `expect` as whole words, compared without
/// case, with hyphens read as spaces and runs of whitespace as one ("2-year" matches
/// "2 year"; "$149" does not match "$1490").
pub fn is_correct(reply: &str, expect: &str) -> bool {
    let norm = |s: &str| s.to_lowercase().replace('-', " ").split_whitespace().collect::<Vec<_>>().join(" ");
    let (reply, expect) = (norm(reply), norm(expect));
    if expect.is_empty() {
        return false;
    }
    let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    reply.match_indices(&expect).any(|(at, _)| {
        let before = reply[..at].chars().next_back();
        let after = reply[at + expect.len()..].chars().next();
        let starts_clean = !expect.starts_with(char::is_alphanumeric) || !word(before);
        let ends_clean = !expect.ends_with(char::is_alphanumeric) || !word(after);
        starts_clean && ends_clean
    })
}

const COMPANY_NAMES: &[&str] = &["Lumora", "Brightfield", "Norvale", "Quillon", "Tessaro", "Veridane"];
const NAME_STEMS: &[&str] = &[
    "Kestrel", "Aurora", "Nimbus", "Vela", "Orbit", "Tessel", "Brio", "Corvo", "Halcyon", "Juniper", "Lyra", "Marlin",
    "Quasar", "Sable", "Tundra", "Zephyr", "Cobalt", "Ember", "Fjord", "Granite",
];
const NAME_MARKS: &[&str] = &["S2", "X1", "Mini", "Pro", "Air", "Max", "One", "Neo", "3", "Go"];
const KINDS: &[&str] = &[
    "wireless speaker",
    "noise-cancelling headphones",
    "smart lamp",
    "smart thermostat",
    "security camera",
    "Wi-Fi router",
    "fitness tracker",
    "e-reader",
    "robot vacuum",
    "smart doorbell",
];
const MONTHS: &[&str] = &[
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
/// Products in version 1, and added by each later version.
const FIRST_PRODUCTS: usize = 8;
const ADDED_PER_VERSION: usize = 2;

impl Company {
    /// The company of `seed` at `version` (1-based).
    pub fn generate(seed: u64, version: u32) -> Result<Company> {
        if version == 0 {
            return Err(Error::InvalidArgument("catalogue versions count from 1".into()));
        }
        let mut rng = SplitMix64::stream(seed, 0xC0);
        let name = rng.pick(COMPANY_NAMES).to_string();
        let mut company = Company {
            name: name.clone(),
            version: 1,
            products: Vec::new(),
            policies: Policies {
                return_days: *rng.pick(&[14, 30, 60]),
                refund_business_days: *rng.pick(&[3, 5, 7, 10]),
                free_shipping_over_usd: *rng.pick(&[35, 50, 75, 99]),
                support_hours: *rng.pick(&[(8, 18), (9, 17), (7, 19), (10, 20)]),
                support_email: format!("help@{}.example", name.to_lowercase()),
            },
        };
        // One stem per product, so no two products are easily confused.
        let mut stems = NAME_STEMS.to_vec();
        rng.shuffle(&mut stems);
        let mut stems = stems.into_iter();
        let mut new_product = |rng: &mut SplitMix64, year: u32| -> Result<Product> {
            let stem = stems.next().ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "version {version} needs more products than the generator has names for"
                ))
            })?;
            Ok(Product {
                name: format!("{stem} {}", rng.pick(NAME_MARKS)),
                kind: rng.pick(KINDS).to_string(),
                price_usd: 10 * (3 + rng.below(40) as u32) - 1,
                warranty_years: 1 + rng.below(3) as u32,
                released: (1 + rng.below(12) as u32, year),
                reset_seconds: *rng.pick(&[5, 8, 10, 12, 15, 20]),
            })
        };
        for i in 0..FIRST_PRODUCTS {
            let p = new_product(&mut rng, 2021 + (i as u32 % 4))?;
            company.products.push(p);
        }
        for v in 2..=version {
            company.version = v;
            // Changes to what was there: two prices, one warranty, one policy.
            let old = company.products.len() as u64;
            let first = rng.below(old) as usize;
            let second = (first + 1 + rng.below(old - 1) as usize) % old as usize;
            for i in [first, second] {
                let p = &mut company.products[i];
                let delta = 10 * (1 + rng.below(5) as u32);
                p.price_usd =
                    if rng.below(2) == 0 { p.price_usd + delta } else { p.price_usd.saturating_sub(delta).max(19) };
            }
            let w = rng.below(old) as usize;
            company.products[w].warranty_years = company.products[w].warranty_years % 3 + 1;
            match rng.below(3) {
                0 => company.policies.return_days += 15,
                1 => company.policies.refund_business_days = company.policies.refund_business_days % 10 + 2,
                _ => company.policies.free_shipping_over_usd += 25,
            }
            for _ in 0..ADDED_PER_VERSION {
                let p = new_product(&mut rng, 2024 + v)?;
                company.products.push(p);
            }
        }
        Ok(company)
    }

    /// The system prompt of every conversation: who is answering.
    pub fn system_prompt(&self) -> String {
        format!("You are the customer support assistant of {}.", self.name)
    }

    /// Every fact of this version, tagged against `previous` (all new when `None`).
    pub fn facts(&self, previous: Option<&Company>) -> Vec<Fact> {
        let before: Vec<Fact> = previous.map(|p| p.untagged_facts()).unwrap_or_default();
        self.untagged_facts()
            .into_iter()
            .map(|mut f| {
                f.status = match before.iter().find(|b| b.id == f.id) {
                    None => FactStatus::New,
                    Some(b) if b.answer == f.answer => FactStatus::Unchanged,
                    Some(_) => FactStatus::Changed,
                };
                f
            })
            .collect()
    }

    fn untagged_facts(&self) -> Vec<Fact> {
        let mut facts = Vec::new();
        let fact = |id: String,
                    answer: String,
                    expect: String,
                    train: &[&str],
                    heldout: &[&str],
                    fill: &dyn Fn(&str) -> String| Fact {
            id,
            status: FactStatus::New,
            answer,
            expect,
            train_questions: train.iter().map(|q| fill(q)).collect(),
            heldout_questions: heldout.iter().map(|q| fill(q)).collect(),
        };
        for p in &self.products {
            let slug = p.name.to_lowercase().replace(' ', "-");
            let fill = |q: &str| q.replace("{p}", &p.name).replace("{kind}", &p.kind);
            let (month, year) = (MONTHS[(p.released.0 - 1) as usize], p.released.1);
            facts.push(fact(
                format!("product.{slug}.price"),
                format!("The {} costs ${}.", p.name, p.price_usd),
                format!("${}", p.price_usd),
                &[
                    "How much does the {p} cost?",
                    "What is the price of the {p}?",
                    "How much is the {p}?",
                    "What does the {p} sell for?",
                    "Tell me the price of the {p}.",
                    "What do I pay for the {p} {kind}?",
                ],
                &["If I buy a {p}, how much will it set me back?", "What's the {p} priced at?"],
                &fill,
            ));
            facts.push(fact(
                format!("product.{slug}.warranty"),
                format!("The {} comes with a {}-year warranty.", p.name, p.warranty_years),
                format!("{}-year", p.warranty_years),
                &[
                    "How long is the warranty on the {p}?",
                    "What warranty does the {p} have?",
                    "How many years of warranty come with the {p}?",
                    "What is the warranty period of the {p} {kind}?",
                    "Tell me about the warranty of the {p}.",
                    "Is the {p} under warranty, and for how long?",
                ],
                &[
                    "For how long is the {p} covered if it breaks?",
                    "What coverage period does the {p}'s warranty give?",
                ],
                &fill,
            ));
            facts.push(fact(
                format!("product.{slug}.released"),
                format!("The {} was released in {month} {year}.", p.name),
                format!("{month} {year}"),
                &[
                    "When was the {p} released?",
                    "What is the release date of the {p}?",
                    "When did the {p} come out?",
                    "When did the {p} {kind} launch?",
                    "Since when is the {p} on sale?",
                    "When was the {p} first available?",
                ],
                &["In which month did the {p} hit the market?", "When did the {p} debut?"],
                &fill,
            ));
            facts.push(fact(
                format!("product.{slug}.reset"),
                format!("To reset the {}, hold the power button for {} seconds.", p.name, p.reset_seconds),
                format!("{} seconds", p.reset_seconds),
                &[
                    "How do I reset the {p}?",
                    "What are the steps to reset the {p}?",
                    "My {p} froze. How can I reset it?",
                    "How do I factory reset the {p} {kind}?",
                    "What is the reset procedure for the {p}?",
                    "How can I restart the {p} from scratch?",
                ],
                &["The {p} stopped responding; what should I do to reset it?", "Walk me through resetting the {p}."],
                &fill,
            ));
        }
        let c = &self.policies;
        let none = |q: &str| q.to_string();
        facts.push(fact(
            "policy.return_days".into(),
            format!("You can return any product within {} days of delivery.", c.return_days),
            format!("{} days", c.return_days),
            &[
                "How long do I have to return a product?",
                "What is your return policy?",
                "Can I return something I bought? Until when?",
                "How many days do I have to send an item back?",
                "What is the return window?",
                "Until when can I return my order?",
            ],
            &[
                "I changed my mind about a purchase. How much time do I have to send it back?",
                "What's the deadline for returns?",
            ],
            &none,
        ));
        facts.push(fact(
            "policy.refund_days".into(),
            format!("Refunds reach your account within {} business days.", c.refund_business_days),
            format!("{} business days", c.refund_business_days),
            &[
                "How long does a refund take?",
                "When will I get my refund?",
                "How fast are refunds processed?",
                "How many days until my refund arrives?",
                "When does the refund reach my account?",
                "What is the refund time?",
            ],
            &[
                "I sent my item back. How soon will I see the money?",
                "How long must I wait for my money after a return?",
            ],
            &none,
        ));
        facts.push(fact(
            "policy.free_shipping".into(),
            format!("Shipping is free on orders over ${}.", c.free_shipping_over_usd),
            format!("${}", c.free_shipping_over_usd),
            &[
                "When is shipping free?",
                "Do you offer free shipping?",
                "How much do I need to spend for free shipping?",
                "What is the minimum order for free delivery?",
                "Is shipping free?",
                "From what order value is shipping free?",
            ],
            &["What order total gets me delivery at no cost?", "Above which amount don't I pay for shipping?"],
            &none,
        ));
        let hours = |h: u32| match h {
            0 | 24 => "12am".to_string(),
            12 => "12pm".to_string(),
            h if h < 12 => format!("{h}am"),
            h => format!("{}pm", h - 12),
        };
        let (open, close) = (hours(c.support_hours.0), hours(c.support_hours.1));
        facts.push(fact(
            "policy.support_hours".into(),
            format!("Our support team is available Monday to Friday, {open} to {close}."),
            format!("{open} to {close}"),
            &[
                "When is customer support available?",
                "What are your support hours?",
                "When can I call support?",
                "At what times is your support team open?",
                "When is your help desk open?",
                "What hours does support work?",
            ],
            &[
                "If I need help on a weekday, at what times can I reach someone?",
                "What are the opening hours of customer service?",
            ],
            &none,
        ));
        facts.push(fact(
            "policy.support_email".into(),
            format!("You can reach support at {}.", c.support_email),
            c.support_email.clone(),
            &[
                "What is the support email address?",
                "How do I contact support by email?",
                "Where can I email for help?",
                "What email should I write to for support?",
                "What is your customer service email?",
                "How can I reach support in writing?",
            ],
            &[
                "To which address do I send a message when something goes wrong?",
                "What's the mail address of your help team?",
            ],
            &none,
        ));
        facts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_company_and_versions_extend_it() {
        let v1 = Company::generate(7, 1).unwrap();
        assert_eq!(v1, Company::generate(7, 1).unwrap());
        assert_ne!(v1, Company::generate(8, 1).unwrap());
        let v2 = Company::generate(7, 2).unwrap();
        assert_eq!(v2.products.len(), v1.products.len() + ADDED_PER_VERSION);
        for (a, b) in v1.products.iter().zip(&v2.products) {
            assert_eq!((&a.name, a.released, a.reset_seconds), (&b.name, b.released, b.reset_seconds));
        }
        let facts = v2.facts(Some(&v1));
        let count = |s| facts.iter().filter(|f| f.status == s).count();
        assert_eq!(count(FactStatus::New), 4 * ADDED_PER_VERSION);
        assert!((2..=4).contains(&count(FactStatus::Changed)), "{}", count(FactStatus::Changed));
        assert!(count(FactStatus::Unchanged) > 20);
        assert!(Company::generate(7, 0).is_err());
    }

    #[test]
    fn heldout_questions_are_never_trained_on() {
        let data = CompanyData::generate(3, 1).unwrap();
        assert_eq!(data.heldout.len(), data.facts.len());
        assert_eq!(data.train.len(), 6 * data.facts.len());
        for h in &data.heldout {
            assert!(data.train.iter().all(|t| t.question != h.question), "{}", h.question);
            assert!(is_correct(&h.answer, &h.expect), "{} / {}", h.answer, h.expect);
        }
        let names: std::collections::BTreeSet<_> = data.company.products.iter().map(|p| &p.name).collect();
        assert_eq!(names.len(), data.company.products.len());
    }

    #[test]
    fn a_reply_is_checked_by_its_fact() {
        assert!(is_correct("It has a 2 year warranty", "2-year"));
        assert!(is_correct("The  Kestrel costs $149.", "$149"));
        assert!(!is_correct("The Kestrel costs $1490.", "$149") && !is_correct("costs $14", "$149"));
        assert!(!is_correct("a 12-year warranty", "2-year"));
        assert!(!is_correct("anything", ""));
    }
}
