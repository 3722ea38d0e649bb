//! Generated ids to streamed text: decodes the whole output after every
//! token and hands out only what is new, holding back an unfinished UTF-8
//! sequence and any tail that could still become a stop string, so the
//! streamed deltas always add up to the non-streamed text.

use crate::tokenizer::{Tokenizer, TokenizerError};

/// What one more token produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Text that is now final (may be empty).
    pub delta: String,
    /// A stop string appeared: generation ends, the stop string and what
    /// follows it are not part of the text.
    pub stopped: bool,
}

/// Assembles the text of one request's output.
#[derive(Debug)]
pub struct TextAssembler<'t> {
    tokenizer: &'t Tokenizer,
    stops: Vec<String>,
    ids: Vec<u32>,
    emitted: usize,
    text: String,
}

impl<'t> TextAssembler<'t> {
    /// An assembler that ends the text at the first of `stops`.
    pub fn new(tokenizer: &'t Tokenizer, stops: Vec<String>) -> Self {
        TextAssembler {
            tokenizer,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ids: Vec::new(),
            emitted: 0,
            text: String::new(),
        }
    }

    /// Adds one generated token (special tokens decode to nothing).
    pub fn push(&mut self, id: u32) -> Result<Pushed, TokenizerError> {
        self.ids.push(id);
        let full = self.tokenizer.decode(&self.ids, true)?;
        if let Some(at) = first_stop(&full, &self.stops) {
            self.text = full[..at].to_string();
            let delta = self.take_until(self.text.len());
            return Ok(Pushed {
                delta,
                stopped: true,
            });
        }
        self.text = full;
        let safe = if self.text.ends_with('\u{FFFD}') {
            self.emitted
        } else {
            self.text.len() - held_suffix(&self.text, &self.stops)
        };
        Ok(Pushed {
            delta: self.take_until(safe),
            stopped: false,
        })
    }

    /// Everything still held back, once generation has ended.
    pub fn finish(&mut self) -> String {
        self.take_until(self.text.len())
    }

    /// The whole text so far (what has been handed out plus what is held).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take_until(&mut self, end: usize) -> String {
        match self.text.get(self.emitted..end) {
            Some(s) if end > self.emitted => {
                let out = s.to_string();
                self.emitted = end;
                out
            }
            _ => String::new(),
        }
    }
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop
/// string (it may still grow into one), on a char boundary.
fn held_suffix(text: &str, stops: &[String]) -> usize {
    let mut held = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            let prefix = &stop[..i];
            if i > held && text.ends_with(prefix) {
                held = i;
            }
        }
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_suffix_is_the_longest_partial_stop() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(held_suffix("abc EN", &stops), 2);
        assert_eq!(held_suffix("abc E", &stops), 1);
        assert_eq!(held_suffix("abc\n", &stops), 1);
        assert_eq!(held_suffix("abc", &stops), 0);
        assert_eq!(first_stop("a\n\nEND", &stops), Some(1));
    }
}
