//! Text in and out: the Hugging Face tokenizer stored in the bundle, incremental decoding for
//! streaming, and the model's chat template (Jinja, rendered with minijinja).

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;
use tokenizers::Tokenizer;

use super::LlmError;

/// The bundle's `tokenizer.json`, loaded.
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TextTokenizer({} tokens)",
            self.inner.get_vocab_size(true)
        )
    }
}

impl TextTokenizer {
    pub fn from_bytes(json: &[u8]) -> Result<TextTokenizer, LlmError> {
        let inner = Tokenizer::from_bytes(json)
            .map_err(|e| LlmError::Tokenizer(format!("cannot read tokenizer.json: {e}")))?;
        Ok(TextTokenizer { inner })
    }

    /// Token ids of `text` as written: no special tokens are added (a chat template or the
    /// caller writes BOS where the model wants one).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| LlmError::Tokenizer(format!("encoding: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a plain (not chat-templated) prompt, as transformers' `tokenizer(text)`
    /// gives them: BOS first when the tokenizer configuration's `add_bos_token` says so (and
    /// never when it says not), else whatever the tokenizer.json post-processor adds.
    pub fn encode_prompt(
        &self,
        text: &str,
        bos_token_id: Option<u32>,
        add_bos_token: Option<bool>,
    ) -> Result<Vec<u32>, LlmError> {
        let with_post_processor = add_bos_token.is_none();
        let enc = self
            .inner
            .encode(text, with_post_processor)
            .map_err(|e| LlmError::Tokenizer(format!("encoding: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if let (Some(true), Some(bos)) = (add_bos_token, bos_token_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, LlmError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| LlmError::Tokenizer(format!("decoding: {e}")))
    }

    /// The token string of `id` (e.g. `<|im_end|>`), if the vocabulary has it.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of generated ids into text pieces as soon as they are complete
/// characters (byte-level tokenizers split UTF-8 sequences across tokens).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds `id` and returns the newly completed text (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String, LlmError> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        // Wait while the tail is an incomplete character (decoded as U+FFFD).
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
            return Ok(String::new());
        }
        let piece = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        Ok(piece)
    }

    /// Whatever is left, incomplete characters included.
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<String, LlmError> {
        let text = tok.decode(&self.ids)?;
        let piece = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}

/// One chat turn.
#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
    pub fn system(content: &str) -> ChatMessage {
        ChatMessage {
            role: "system".into(),
            content: content.into(),
        }
    }
}

/// Renders a Hugging Face chat template (Jinja) for `messages`, ending with the assistant
/// prompt (`add_generation_prompt = true`). Python string methods used by templates
/// (`.strip()`, `.startswith()`, ...) and `raise_exception` are available.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, LlmError> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| LlmError::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| LlmError::Template(e.to_string()))?;
    tmpl.render(context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| LlmError::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_the_smollm2_template_as_transformers_does() {
        let out = render_chat(
            SMOLLM_TEMPLATE,
            &[ChatMessage::user("Hi!")],
            "<|im_start|>",
            "<|im_end|>",
        )
        .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system = render_chat(
            SMOLLM_TEMPLATE,
            &[ChatMessage::system("Be brief."), ChatMessage::user("Hi!")],
            "",
            "",
        )
        .unwrap();
        assert!(with_system.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ messages[0]['content'].strip() }}";
        assert_eq!(
            render_chat(t, &[ChatMessage::user("  x  ")], "", "").unwrap(),
            "x"
        );
        let err = render_chat(t, &[ChatMessage::system("s")], "", "").unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
        let err = render_chat("{% for %}", &[], "", "").unwrap_err();
        assert!(err.to_string().starts_with("chat template"), "{err}");
    }
}
