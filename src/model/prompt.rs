//! The Qwen3-Reranker prompt and its truncation: the prefix, then
//! `<Instruct>: ..\n<Query>: ..\n<Document>: ..`, then the suffix, tokenized with special tokens
//! recognised in the text. Only the document is cut to fit `max_length`, then the query; the
//! template never is.
//!
//! Tokenizing costs time and memory in proportion to the text (a 4 MB document took ~530 MB), so
//! every text is first cut to what `max_length` tokens can possibly cover: no token of the
//! vocabulary is longer than [`PromptBuilder::max_token_bytes`], so the first `n` tokens of any
//! text lie within its first `n * max_token_bytes` bytes, and text past that can never be kept.

use std::path::Path;

use tokenizers::Tokenizer;

use super::{ModelError, Result};

pub const PREFIX: &str = "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n";
pub const SUFFIX: &str = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
pub const DEFAULT_INSTRUCTION: &str = "Given a web search query, retrieve relevant passages that answer the query";

/// The tokenizer plus the ids the head needs.
pub struct PromptBuilder {
    tok: Tokenizer,
    pub yes_id: u32,
    pub no_id: u32,
    pub pad_id: u32,
    /// The longest token of the vocabulary, in bytes (as written in the vocabulary, which for a
    /// byte-level BPE is at least the bytes it stands for).
    pub max_token_bytes: usize,
}

pub(crate) fn render(instruction: &str, query: &str, doc: &str) -> String {
    format!("{PREFIX}<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}{SUFFIX}")
}

impl PromptBuilder {
    pub fn from_file(path: &Path) -> Result<Self> {
        let tok = Tokenizer::from_file(path)
            .map_err(|e| ModelError::file(path, None, format!("not a readable tokenizer: {e}")))?;
        let id = |t: &str, field: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| ModelError::file(path, Some(field.to_string()), format!("has no token `{t}`")))
        };
        let yes_id = id("yes", "model.vocab")?;
        let no_id = id("no", "model.vocab")?;
        let pad_id = id("<|endoftext|>", "added_tokens")?;
        let max_token_bytes = tok.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1);
        Ok(Self { tok, yes_id, no_id, pad_id, max_token_bytes })
    }

    /// `text` cut (at a character boundary) to the most bytes `tokens` tokens can cover: its
    /// first `tokens` tokens are the same, and a text that was cut still has at least `tokens`.
    pub fn cap<'a>(&self, text: &'a str, tokens: usize) -> &'a str {
        let most = tokens.saturating_add(1).saturating_mul(self.max_token_bytes);
        if text.len() <= most { text } else { &text[..floor_char_boundary(text, most)] }
    }

    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tok.encode(text, false).map_err(|e| ModelError::Invalid(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Char offsets where each token of `text` ends, to cut text at a token boundary.
    fn token_ends(&self, text: &str) -> Result<Vec<usize>> {
        let enc = self.tok.encode(text, false).map_err(|e| ModelError::Invalid(format!("tokenizing: {e}")))?;
        Ok(enc.get_offsets().iter().map(|&(_, e)| e).collect())
    }

    /// Tokens of the whole prompt for one pair, before any truncation.
    /// (At most `limit` past it: texts are capped first, so a longer prompt counts as over.)
    pub fn prompt_len(&self, instruction: &str, query: &str, doc: &str, limit: usize) -> Result<usize> {
        Ok(self.encode_text(&render(instruction, self.cap(query, limit), self.cap(doc, limit)))?.len())
    }

    /// `text` cut to its first `max_tokens` tokens (at a token boundary; whole when it fits).
    pub fn truncate_tokens(&self, text: &str, max_tokens: usize) -> Result<String> {
        let text = self.cap(text, max_tokens);
        let ends = self.token_ends(text)?;
        if ends.len() <= max_tokens {
            return Ok(text.to_string());
        }
        let cut = if max_tokens == 0 { 0 } else { ends[max_tokens - 1] };
        Ok(text[..floor_char_boundary(text, cut.min(text.len()))].to_string())
    }

    /// Tokens of the template alone (empty query and document): the floor for `max_length`.
    pub fn template_len(&self, instruction: &str) -> Result<usize> {
        Ok(self.encode_text(&render(instruction, "", ""))?.len())
    }

    /// Token ids of the prompt for one pair, at most `max_length` long.
    ///
    /// A pair that does not fit has each text cut to its own first `max_length` tokens first (no
    /// more of either could be kept), so that how it is cut depends only on those tokens, never
    /// on how much longer the text went on.
    pub fn encode_pair(&self, instruction: &str, query: &str, doc: &str, max_length: usize) -> Result<Vec<u32>> {
        let ids = self.encode_text(&render(instruction, self.cap(query, max_length), self.cap(doc, max_length)))?;
        if ids.len() <= max_length {
            return Ok(ids);
        }
        let (query, doc) = (self.truncate_tokens(query, max_length)?, self.truncate_tokens(doc, max_length)?);
        self.encode_whole_pair(instruction, &query, &doc, max_length)
    }

    /// [`Self::encode_pair`] on the texts as given, however long.
    fn encode_whole_pair(&self, instruction: &str, query: &str, doc: &str, max_length: usize) -> Result<Vec<u32>> {
        let ids = self.encode_text(&render(instruction, query, doc))?;
        if ids.len() <= max_length {
            return Ok(ids);
        }
        let floor = self.template_len(instruction)?;
        if floor >= max_length {
            // At the template's own length the query and the document would both be cut to
            // nothing and every pair would score the same.
            return Err(ModelError::Invalid(format!(
                "max_length {max_length} leaves no room for the query and the document: the prompt template \
                 alone is {floor} tokens"
            )));
        }
        let (mut query, mut doc) = (query.to_string(), doc.to_string());
        let mut ids = ids;
        // Cut the document by the excess (in its own tokens), re-tokenize the whole prompt, repeat:
        // token boundaries can move by one where pieces meet, so a couple of rounds may be needed.
        while ids.len() > max_length {
            let excess = ids.len() - max_length;
            let target = if !doc.is_empty() { &mut doc } else { &mut query };
            let ends = self.token_ends(target)?;
            let keep = ends.len().saturating_sub(excess);
            let cut = if keep == 0 { 0 } else { ends[keep - 1] };
            let cut = floor_char_boundary(target, cut.min(target.len()));
            // Always make progress even if a boundary shift left the text the same length.
            let cut = if cut >= target.len() { prev_char_boundary(target) } else { cut };
            target.truncate(cut);
            ids = self.encode_text(&render(instruction, &query, &doc))?;
        }
        Ok(ids)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn prev_char_boundary(s: &str) -> usize {
    s.char_indices().last().map(|(i, _)| i).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cutting texts to what `max_length` tokens can cover changes no prompt: long prose, one
    /// endless word, whitespace runs, multi-byte characters, a long query.
    #[test]
    fn capping_long_texts_changes_no_prompt() {
        let p = PromptBuilder::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen3/tokenizer.json"),
        )
        .unwrap();
        assert!(p.max_token_bytes >= 16, "{}", p.max_token_bytes);
        let prose = "The borrow checker enforces ownership rules at compile time, so that ".repeat(2000);
        let texts = [
            prose.clone(),
            "a".repeat(200_000),
            format!("{}{}", " ".repeat(50_000), prose),
            "日本語のテキストと絵文字 🦀🦀 が混ざった文書。".repeat(3000),
            "x\n\n\t ".repeat(40_000),
        ];
        for max_length in [64, 200, 512] {
            // The first `n` tokens of the whole text, from its whole tokenization.
            let first = |t: &str, n: usize| {
                let ends = p.token_ends(t).unwrap();
                if ends.len() <= n { t.to_string() } else { t[..floor_char_boundary(t, ends[n - 1])].to_string() }
            };
            for t in &texts {
                assert!(t.len() > p.cap(t, max_length).len(), "the test text is not long enough");
                let capped = p.encode_pair("judge", "a query", t, max_length).unwrap();
                let whole = p.encode_whole_pair("judge", "a query", &first(t, max_length), max_length).unwrap();
                assert_eq!(capped, whole, "max_length {max_length}, text {:?}...", &t[..40]);
                assert!(capped.len() <= max_length);
                let capped = p.encode_pair("judge", t, t, max_length).unwrap();
                let (q, d) = (first(t, max_length), first(t, max_length));
                assert_eq!(capped, p.encode_whole_pair("judge", &q, &d, max_length).unwrap(), "both long");
                let capped = p.encode_pair("judge", t, "a document", max_length).unwrap();
                let whole = p.encode_whole_pair("judge", &first(t, max_length), "a document", max_length).unwrap();
                assert_eq!(capped, whole, "a long query, max_length {max_length}");
                assert_eq!(p.truncate_tokens(t, max_length / 2).unwrap(), first(t, max_length / 2), "truncate_tokens");
            }
        }
    }
}
