//! General prompts, far from any company's catalogue: what the base model could already do
//! and an adapter should leave alone. Two disjoint sets: the retention probe, on which the
//! fine-tuned model is compared with the base, and the replay set, whose answers by the base
//! model itself are mixed into training (self-distillation) so the adapter keeps the base's
//! behaviour outside its domain. No prompt is in both.

/// The retention probe.
pub const RETENTION_PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what photosynthesis is.",
    "What is 12 times 7?",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
];

/// The replay set.
pub const REPLAY_PROMPTS: &[&str] = &[
    "What is the largest planet in our solar system?",
    "Write a short poem about autumn leaves.",
    "How many days are there in a leap year?",
    "What does a thermometer measure?",
    "Give me a simple recipe for pancakes.",
    "Who painted the Mona Lisa?",
    "What is the square root of 81?",
    "Explain what gravity is to a child.",
    "Name three primary colors.",
    "What is the chemical symbol for gold?",
    "How do I make a cup of tea?",
    "What is the tallest mountain in the world?",
    "Suggest a name for a pet goldfish.",
    "What language is spoken in Brazil?",
    "Why is the sky blue?",
    "Write one sentence about friendship.",
    "What is 15 plus 27?",
    "How many continents are there?",
    "What do bees make?",
    "Give me two tips for studying for an exam.",
    "What is the freezing point of water in Fahrenheit?",
    "Who was the first person to walk on the moon?",
    "What is the opposite of 'ancient'?",
    "Describe a rainbow in one sentence.",
    "How many legs does a spider have?",
    "What is the main ingredient in guacamole?",
    "Explain what a noun is.",
    "What is the capital of Japan?",
    "Write a limerick about a cat.",
    "What is the speed of light, roughly?",
    "Name a famous composer of classical music.",
    "How do plants get water?",
    "What is 9 times 8?",
    "Give me a synonym for 'happy'.",
    "What causes the seasons on Earth?",
    "Translate 'thank you' into French.",
    "What is the largest ocean on Earth?",
    "How many minutes are in three hours?",
    "What is a prime number?",
    "Suggest a healthy breakfast.",
    "Who discovered penicillin?",
    "What is the plural of 'mouse'?",
    "Explain what a volcano is.",
    "What instrument has 88 keys?",
    "Write a sentence using the word 'curious'.",
    "What is the hardest natural substance?",
    "How many sides does a hexagon have?",
    "What is the longest river in Africa?",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_sets_are_disjoint() {
        for p in RETENTION_PROMPTS {
            assert!(!REPLAY_PROMPTS.contains(p), "{p}");
        }
        let mut all: Vec<&str> = RETENTION_PROMPTS.iter().chain(REPLAY_PROMPTS).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), RETENTION_PROMPTS.len() + REPLAY_PROMPTS.len());
    }
}
