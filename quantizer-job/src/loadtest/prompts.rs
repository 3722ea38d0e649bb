//! Synthetic prompts of an exact token count, made of real English words.
//!
//! For each prompt, words are drawn at random (seeded, different per
//! prompt so a server's prefix cache does not turn the test into a cache
//! benchmark) until the text surely has more than `n` tokens; the text is
//! encoded once, cut to its first `n` ids, decoded, and encoded again. When
//! that round trip gives exactly `n` tokens (the usual case with byte-level
//! BPE: the cut falls on a token boundary) the prompt is exact; otherwise
//! one fewer id is tried, and so on, so a prompt is never longer than `n`.
//! The token count is the target tokenizer's: pass the served model's
//! tokenizer for exact counts (the report also gives the server's count).

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::tokenizer::{Tokenizer, TokenizerError};

/// Common English words, the default vocabulary of the prompts.
#[rustfmt::skip]
pub const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be",
    "by", "at", "this", "from", "have", "or", "one", "had", "not", "but", "what", "all", "were",
    "when", "we", "there", "can", "an", "your", "which", "their", "said", "if", "do", "will",
    "each", "about", "how", "up", "out", "them", "then", "she", "many", "some", "so", "these",
    "would", "other", "into", "has", "more", "her", "two", "like", "him", "see", "time", "could",
    "no", "make", "than", "first", "been", "its", "who", "now", "people", "my", "made", "over",
    "did", "down", "only", "way", "find", "use", "may", "water", "long", "little", "very", "after",
    "words", "called", "just", "where", "most", "know", "get", "through", "back", "much", "before",
    "go", "good", "new", "write", "our", "used", "me", "man", "too", "any", "day", "same", "right",
    "look", "think", "also", "around", "another", "came", "come", "work", "three", "word", "must",
    "because", "does", "part", "even", "place", "well", "such", "here", "take", "why", "things",
    "help", "put", "years", "different", "away", "again", "off", "went", "old", "number", "great",
    "tell", "men", "say", "small", "every", "found", "still", "between", "name", "should", "home",
    "big", "give", "air", "line", "set", "own", "under", "read", "last", "never", "us", "left",
    "end", "along", "while", "might", "next", "sound", "below", "saw", "something", "thought",
    "both", "few", "those", "always", "show", "large", "often", "together", "asked", "house",
    "world", "going", "want", "school", "important", "until", "form", "food", "keep", "children",
    "feet", "land", "side", "without", "boy", "once", "animals", "life", "enough", "took",
    "sometimes", "four", "head", "above", "kind", "began", "almost", "live", "page", "got",
    "earth", "need", "far", "hand", "high", "year", "mother", "light", "parts", "country",
    "father", "let", "night", "following", "picture", "being", "study", "second", "eyes", "soon",
    "times", "story", "boys", "since", "white", "days", "paper", "hard", "near", "sentence",
    "better", "best", "across", "during", "today", "others", "however", "sure", "means", "knew",
    "try", "told", "young", "miles", "sun", "ways", "thing", "whole", "hear", "example", "heard",
    "several", "change", "answer", "room", "sea", "against", "top", "turned", "learn", "point",
    "city", "play", "toward", "five", "using", "himself", "usually", "money", "seen", "car",
    "morning", "body", "upon", "family", "later", "music", "color", "stand", "questions", "fish",
    "area", "mark", "horse", "birds", "problem", "complete", "ever", "piece", "friends", "easy",
    "order", "red", "door", "become", "ship", "run", "river",
];

/// A prompt and its token count under the tokenizer that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The text.
    pub text: String,
    /// Its tokens.
    pub tokens: usize,
}

/// Makes `count` prompts of `tokens` tokens from `words` (never empty:
/// [`WORDS`] when `words` is), seeded by `seed`.
pub fn synthetic_prompts(
    tokenizer: &Tokenizer,
    words: &[String],
    tokens: usize,
    count: usize,
    seed: u64,
) -> Result<Vec<Prompt>, TokenizerError> {
    let default: Vec<String> = WORDS.iter().map(|w| (*w).to_string()).collect();
    let words = if words.is_empty() { &default } else { words };
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| one_prompt(tokenizer, words, tokens.max(1), &mut rng))
        .collect()
}

fn one_prompt(
    tokenizer: &Tokenizer,
    words: &[String],
    target: usize,
    rng: &mut impl Rng,
) -> Result<Prompt, TokenizerError> {
    // Every word is at least one token, so `target + 8` words overshoot.
    let mut text = String::new();
    for i in 0..target + 8 {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(words.choose(rng).map_or("the", String::as_str));
    }
    let ids = tokenizer.encode(&text)?;
    let mut n = target.min(ids.len());
    let mut best: Option<Prompt> = None;
    while n > 0 {
        let cut = tokenizer.decode(&ids[..n], false)?;
        let again = tokenizer.encode(&cut)?.len();
        if again <= target {
            best = Some(Prompt {
                text: cut,
                tokens: again,
            });
            break;
        }
        n -= 1;
    }
    Ok(best.unwrap_or(Prompt {
        text,
        tokens: ids.len(),
    }))
}

/// The words of a text file, for prompts drawn from a corpus instead.
pub fn words_of(text: &str) -> Vec<String> {
    text.split_whitespace()
        .filter(|w| w.chars().all(|c| c.is_alphabetic()))
        .map(str::to_string)
        .collect()
}
