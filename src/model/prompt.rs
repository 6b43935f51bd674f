//! The Qwen3-Reranker prompt and its truncation: the prefix, then
//! `<Instruct>: ..\n<Query>: ..\n<Document>: ..`, then the suffix, tokenized with special tokens
//! recognised in the text. Only the document is cut to fit `max_length`, then the query; the
//! template never is.

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
}

fn render(instruction: &str, query: &str, doc: &str) -> String {
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
        Ok(Self { tok, yes_id, no_id, pad_id })
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
    pub fn prompt_len(&self, instruction: &str, query: &str, doc: &str) -> Result<usize> {
        Ok(self.encode_text(&render(instruction, query, doc))?.len())
    }

    /// `text` cut to its first `max_tokens` tokens (at a token boundary; whole when it fits).
    pub fn truncate_tokens(&self, text: &str, max_tokens: usize) -> Result<String> {
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
    pub fn encode_pair(&self, instruction: &str, query: &str, doc: &str, max_length: usize) -> Result<Vec<u32>> {
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
