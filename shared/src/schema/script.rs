//! A pg_dump plain-format script, split into what it is made of: session settings, psql
//! meta-commands and TOC entries (one object each, with its statements).
//!
//! pg_dump writes a header comment before every object —
//! `-- Name: people; Type: TABLE; Schema: app; Owner: alice` — and Tidemark restores
//! entry by entry, so that an error names the object, owner and privilege statements can be
//! left out as `pg_restore --no-owner --no-privileges` does, and a table subset can pick
//! the entries it needs. Statements are split by a lexer that knows what the server's lexer
//! knows about quoting — `'...'`, `E'...'`, `"..."`, `$tag$...$tag$`, comments, and the
//! `BEGIN ATOMIC ... END` bodies of SQL-standard functions — so a `;` or a header-like
//! line inside a function body never splits anything.

use std::fmt;

/// Why a script could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error("unterminated {what} starting at line {line}")]
    Unterminated { what: &'static str, line: usize },
    #[error("unexpected data in a schema script at line {line} (COPY ... FROM stdin)")]
    UnexpectedData { line: usize },
}

/// One SQL statement, its text from the first token to the closing `;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub text: String,
}

/// One object of the dump, as pg_dump's TOC names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The TOC tag, e.g. `people`, `people people_pkey`, `COLUMN people.born`.
    pub name: String,
    /// The TOC type, e.g. `TABLE`, `FK CONSTRAINT`, `MATERIALIZED VIEW DATA`.
    pub kind: String,
    /// `None` where pg_dump writes `-` (schemas, extensions, ...).
    pub schema: Option<String>,
    pub owner: Option<String>,
    pub statements: Vec<Statement>,
}

impl Entry {
    /// `TYPE app.mood`, `TRIGGER app.people people_audit`: how errors and reports name it.
    pub fn label(&self) -> String {
        match &self.schema {
            // Tags like `people people_pkey` or `COLUMN people.born` read better whole.
            Some(schema) if self.name.contains(' ') => {
                format!("{} {} (schema {schema})", self.kind, self.name)
            }
            Some(schema) => format!("{} {}.{}", self.kind, schema, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }

    /// Privilege entries (`GRANT`/`REVOKE`, default privileges), which
    /// `pg_restore --no-privileges` leaves out.
    pub fn is_privileges(&self) -> bool {
        matches!(self.kind.as_str(), "ACL" | "DEFAULT ACL" | "ACL LANGUAGE")
    }
}

/// A piece of the script, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// `SET name = value;` or `SELECT pg_catalog.set_config(...);`: session state.
    Setting(Statement),
    /// A psql meta-command line such as `\restrict KEY`; not SQL.
    Meta(String),
    Entry(Entry),
}

/// A whole script.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Script {
    pub items: Vec<Item>,
}

impl Script {
    /// Splits pg_dump's plain output (or pg_dumpall's; statements outside any TOC header
    /// land in an entry of kind `PREAMBLE`).
    ///
    /// # Errors
    /// [`ScriptError`] for an unterminated quote, comment or statement, and for data
    /// (`COPY ... FROM stdin`), which a schema script must not hold.
    pub fn parse(text: &str) -> Result<Script, ScriptError> {
        parse_spans(text, &mut |_, _| true)
    }

    /// The entries, in order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.items.iter().filter_map(|i| match i {
            Item::Entry(e) => Some(e),
            _ => None,
        })
    }

    /// SHA-256 (hex) of `text`, the script this was parsed from, with the key of its own
    /// `\restrict KEY` and `\unrestrict KEY` lines left out: pg_dump 17.6+ draws that key at
    /// random on every run, so two dumps of the same schema differ only there. Equal digests
    /// are scripts that restore the same; only the script's own meta-command lines (found by
    /// the parser, never a line inside a body) are shortened.
    pub fn digest_without_restrict_key(&self, text: &str) -> String {
        use sha2::{Digest, Sha256};
        let restrict_lines: Vec<&str> = self
            .items
            .iter()
            .filter_map(|i| match i {
                Item::Meta(m) if restrict_command(m).is_some() => Some(m.as_str()),
                _ => None,
            })
            .collect();
        let mut hasher = Sha256::new();
        for line in text.split_inclusive('\n') {
            let trimmed = line.trim();
            match restrict_command(trimmed).filter(|_| restrict_lines.contains(&trimmed)) {
                Some(command) => {
                    hasher.update(command.as_bytes());
                    hasher.update(b"\n");
                }
                None => hasher.update(line.as_bytes()),
            }
        }
        hex::encode(hasher.finalize())
    }
}

/// `\restrict` or `\unrestrict` when `line` is that meta-command with its key.
fn restrict_command(line: &str) -> Option<&str> {
    let (command, key) = line.split_once(' ')?;
    (matches!(command, "\\restrict" | "\\unrestrict") && !key.trim().is_empty()).then_some(command)
}

/// `text` without the session settings (`SET name = ...;` between statements, never inside
/// a body) that `keep` refuses, each with the rest of its line, and that text parsed;
/// also the names left out. pg_dump 18 writes `SET transaction_timeout = 0;` for every
/// server, which a server before 17 refuses: a script stored without it runs with psql's
/// `ON_ERROR_STOP` on the source's own version.
///
/// # Errors
/// As [`Script::parse`].
pub fn without_settings(
    text: &str,
    keep: &dyn Fn(&str) -> bool,
) -> Result<(String, Script, Vec<String>), ScriptError> {
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    let mut dropped = Vec::new();
    let script = parse_spans(text, &mut |span, statement| {
        let Some(name) = statement.setting_name().filter(|n| !keep(n)) else {
            return true;
        };
        // With the newline that ends its line, if nothing else is on it.
        let mut end = span.1;
        let rest = &text[end..];
        let line_rest = rest.find('\n').map_or(rest, |i| &rest[..=i]);
        if line_rest.trim().is_empty() {
            end += line_rest.len();
        }
        cuts.push((span.0, end));
        dropped.push(name);
        false
    })?;
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in cuts {
        out.push_str(&text[at..start]);
        at = end;
    }
    out.push_str(&text[at..]);
    Ok((out, script, dropped))
}

/// [`Script::parse`], telling `on_setting` where each session setting statement lies;
/// a setting it answers `false` for is left out of the script.
fn parse_spans(
    text: &str,
    on_setting: &mut dyn FnMut((usize, usize), &Statement) -> bool,
) -> Result<Script, ScriptError> {
    let mut items = Vec::new();
    let mut current: Option<Entry> = None;
    let bytes = text.as_bytes();
    let mut pos = 0;
    while pos < bytes.len() {
        // Between statements: whitespace, comment lines, meta-commands, headers.
        let line_end = memchr::memchr(b'\n', &bytes[pos..]).map_or(bytes.len(), |i| pos + i);
        let line = &text[pos..line_end];
        let trimmed = line.trim_start();
        if trimmed.is_empty() {
            pos = line_end + 1;
            continue;
        }
        if trimmed.starts_with('\\') {
            items.push(Item::Meta(trimmed.trim_end().to_owned()));
            pos = line_end + 1;
            continue;
        }
        if trimmed.starts_with("--") {
            if let Some((header, next)) = header_at(text, pos) {
                if let Some(entry) = current.take() {
                    items.push(Item::Entry(entry));
                }
                current = Some(header);
                pos = next;
            } else {
                pos = line_end + 1;
            }
            continue;
        }
        let start = pos + (line.len() - trimmed.len());
        let end = statement_end(text, start)?;
        let statement = Statement {
            text: text[start..end].to_owned(),
        };
        let words = statement.words(4);
        if words.first().map(String::as_str) == Some("copy")
            && statement
                .text
                .trim_end_matches(';')
                .trim_end()
                .to_lowercase()
                .ends_with("from stdin")
        {
            return Err(ScriptError::UnexpectedData {
                line: line_number(text, start),
            });
        }
        if statement.is_setting() {
            if on_setting((start, end), &statement) {
                // pg_dump writes an entry's settings (its tablespace, its table access
                // method) before the entry's header: a setting after an entry's
                // statements belongs to the entries that follow, not to that one.
                if let Some(entry) = current.take() {
                    items.push(Item::Entry(entry));
                }
                items.push(Item::Setting(statement));
            }
        } else {
            current
                .get_or_insert_with(|| Entry {
                    name: String::new(),
                    kind: "PREAMBLE".to_owned(),
                    schema: None,
                    owner: None,
                    statements: Vec::new(),
                })
                .statements
                .push(statement);
        }
        pos = end;
    }
    if let Some(entry) = current.take() {
        items.push(Item::Entry(entry));
    }
    Ok(Script { items })
}

fn line_number(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A TOC header at `pos` (`--`, `-- Name: ...; Type: ...; Schema: ...; Owner: ...`, `--`):
/// the entry it opens and where the text after it starts.
fn header_at(text: &str, pos: usize) -> Option<(Entry, usize)> {
    let mut lines = text[pos..].split_inclusive('\n');
    let first = lines.next()?;
    let second = lines.next()?;
    let third = lines.next()?;
    if first.trim_end() != "--" || third.trim_end() != "--" {
        return None;
    }
    let body = second.trim_end_matches(['\n', '\r']);
    let body = body.strip_prefix("-- ")?;
    let body = body.strip_prefix("Data for ").unwrap_or(body);
    let body = body.strip_prefix("Name: ")?;
    // The type is one of pg_dump's fixed descriptors (capitals and spaces); names may hold
    // anything, so find the first "; Type: X; Schema: " that fits.
    let mut search = 0;
    let (name, rest) = loop {
        let at = body[search..].find("; Type: ")? + search;
        let after = &body[at + "; Type: ".len()..];
        let fits = after.find("; Schema: ").is_some_and(|n| {
            n > 0
                && after[..n]
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b' ')
        });
        if fits {
            break (&body[..at], after);
        }
        search = at + 1;
    };
    let schema_at = rest.find("; Schema: ")?;
    let kind = &rest[..schema_at];
    let rest = &rest[schema_at + "; Schema: ".len()..];
    let owner_at = rest.find("; Owner: ")?;
    let schema = &rest[..owner_at];
    let owner = &rest[owner_at + "; Owner: ".len()..];
    let owner = owner.split("; Tablespace: ").next().unwrap_or(owner);
    let consumed = first.len() + second.len() + third.len();
    Some((
        Entry {
            name: name.to_owned(),
            kind: kind.to_owned(),
            schema: (schema != "-").then(|| schema.to_owned()),
            owner: (!owner.is_empty() && owner != "-").then(|| owner.to_owned()),
            statements: Vec::new(),
        },
        pos + consumed,
    ))
}

/// A lexical token of SQL, as far as splitting and recognising statements needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// An unquoted identifier or keyword, folded to lower case.
    Word(String),
    /// A `"quoted"` identifier, unescaped.
    Quoted(String),
    /// A string or dollar-quoted literal (its text is not kept).
    Literal,
    /// Any other character: punctuation, operators, digits.
    Punct(char),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Word(w) => f.write_str(w),
            Token::Quoted(q) => write!(f, "\"{}\"", q.replace('"', "\"\"")),
            Token::Literal => f.write_str("'...'"),
            Token::Punct(c) => write!(f, "{c}"),
        }
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// A lexer over one statement or a whole script.
struct Lexer<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str, pos: usize) -> Self {
        Self { text, pos }
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.text.as_bytes().get(self.pos + ahead).copied()
    }

    fn fail(&self, what: &'static str, start: usize) -> ScriptError {
        ScriptError::Unterminated {
            what,
            line: line_number(self.text, start),
        }
    }

    /// The next token, skipping whitespace and comments; `None` at the end.
    fn next_token(&mut self) -> Result<Option<(Token, usize)>, ScriptError> {
        let bytes = self.text.as_bytes();
        loop {
            let Some(c) = self.peek(0) else {
                return Ok(None);
            };
            let start = self.pos;
            match c {
                c if c.is_ascii_whitespace() => self.pos += 1,
                b'-' if self.peek(1) == Some(b'-') => {
                    self.pos = memchr::memchr(b'\n', &bytes[self.pos..])
                        .map_or(bytes.len(), |i| self.pos + i + 1);
                }
                b'/' if self.peek(1) == Some(b'*') => {
                    let mut depth = 0usize;
                    loop {
                        match (self.peek(0), self.peek(1)) {
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.pos += 2;
                            }
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.pos += 2;
                                if depth == 0 {
                                    break;
                                }
                            }
                            (Some(_), _) => self.pos += 1,
                            (None, _) => return Err(self.fail("comment", start)),
                        }
                    }
                }
                b'\'' => {
                    self.string(start, false)?;
                    return Ok(Some((Token::Literal, start)));
                }
                b'"' => {
                    self.pos += 1;
                    let mut ident = String::new();
                    loop {
                        match self.peek(0) {
                            Some(b'"') if self.peek(1) == Some(b'"') => {
                                ident.push('"');
                                self.pos += 2;
                            }
                            Some(b'"') => {
                                self.pos += 1;
                                break;
                            }
                            Some(_) => {
                                let ch = self.text[self.pos..].chars().next().unwrap_or('?');
                                ident.push(ch);
                                self.pos += ch.len_utf8();
                            }
                            None => return Err(self.fail("quoted identifier", start)),
                        }
                    }
                    return Ok(Some((Token::Quoted(ident), start)));
                }
                b'$' => {
                    if let Some(tag_len) = self.dollar_tag() {
                        let tag = &self.text[self.pos..self.pos + tag_len];
                        let body_start = self.pos + tag_len;
                        match self.text[body_start..].find(tag) {
                            Some(i) => self.pos = body_start + i + tag_len,
                            None => return Err(self.fail("dollar-quoted string", start)),
                        }
                        return Ok(Some((Token::Literal, start)));
                    }
                    self.pos += 1;
                    return Ok(Some((Token::Punct('$'), start)));
                }
                c if is_ident_start(c) => {
                    let mut end = self.pos;
                    while end < bytes.len() && is_ident_char(bytes[end]) {
                        end += 1;
                    }
                    let word = &self.text[self.pos..end];
                    // E'...' is a string with backslash escapes.
                    if word.eq_ignore_ascii_case("e") && bytes.get(end) == Some(&b'\'') {
                        self.pos = end;
                        self.string(start, true)?;
                        return Ok(Some((Token::Literal, start)));
                    }
                    self.pos = end;
                    return Ok(Some((Token::Word(word.to_lowercase()), start)));
                }
                _ => {
                    let ch = self.text[self.pos..].chars().next().unwrap_or('?');
                    self.pos += ch.len_utf8();
                    return Ok(Some((Token::Punct(ch), start)));
                }
            }
        }
    }

    /// Consumes `'...'` at the cursor (`''` doubles a quote; with `escapes`, so does `\'`).
    fn string(&mut self, start: usize, escapes: bool) -> Result<(), ScriptError> {
        self.pos += 1;
        loop {
            match self.peek(0) {
                Some(b'\'') if self.peek(1) == Some(b'\'') => self.pos += 2,
                Some(b'\'') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') if escapes => self.pos += 2,
                Some(_) => self.pos += 1,
                None => return Err(self.fail("string literal", start)),
            }
        }
    }

    /// The length of a `$tag$` opening at the cursor, if there is one (`$1` is a parameter).
    fn dollar_tag(&self) -> Option<usize> {
        let bytes = self.text.as_bytes();
        let mut i = self.pos + 1;
        if i < bytes.len() && bytes[i] == b'$' {
            return Some(2);
        }
        if i >= bytes.len() || !is_ident_start(bytes[i]) {
            return None;
        }
        while i < bytes.len() && (is_ident_start(bytes[i]) || bytes[i].is_ascii_digit()) {
            i += 1;
        }
        (i < bytes.len() && bytes[i] == b'$').then(|| i + 1 - self.pos)
    }
}

/// Where the statement starting at `start` ends (just past its `;`).
fn statement_end(text: &str, start: usize) -> Result<usize, ScriptError> {
    let mut lexer = Lexer::new(text, start);
    let mut parens = 0i32;
    let mut atomic_depth = 0usize;
    let mut leading: Vec<String> = Vec::new();
    let mut previous: Option<Token> = None;
    while let Some((token, _)) = lexer.next_token()? {
        if leading.len() < 4 {
            if let Token::Word(w) = &token {
                leading.push(w.clone());
            } else {
                leading.push(String::new());
            }
        }
        let routine = leading.first().map(String::as_str) == Some("create")
            && match leading.get(1).map(String::as_str) {
                Some("function" | "procedure") => true,
                Some("or") => {
                    leading.get(2).map(String::as_str) == Some("replace")
                        && matches!(
                            leading.get(3).map(String::as_str),
                            Some("function" | "procedure")
                        )
                }
                _ => false,
            };
        match &token {
            Token::Punct('(') => parens += 1,
            Token::Punct(')') => parens -= 1,
            Token::Punct(';') if parens <= 0 && atomic_depth == 0 => return Ok(lexer.pos),
            Token::Word(w) if routine && parens <= 0 => match w.as_str() {
                "atomic" if previous == Some(Token::Word("begin".into())) => atomic_depth += 1,
                "case" if atomic_depth > 0 => atomic_depth += 1,
                "end" if atomic_depth > 0 => atomic_depth -= 1,
                _ => {}
            },
            _ => {}
        }
        previous = Some(token);
    }
    Err(ScriptError::Unterminated {
        what: "statement (no closing ;)",
        line: line_number(text, start),
    })
}

impl Statement {
    /// The statement's tokens.
    pub fn tokens(&self) -> Vec<Token> {
        let mut lexer = Lexer::new(&self.text, 0);
        let mut out = Vec::new();
        while let Ok(Some((token, _))) = lexer.next_token() {
            out.push(token);
        }
        out
    }

    /// Up to `n` leading unquoted words, lower-cased.
    pub fn words(&self, n: usize) -> Vec<String> {
        let mut lexer = Lexer::new(&self.text, 0);
        let mut out = Vec::new();
        while out.len() < n {
            match lexer.next_token() {
                Ok(Some((Token::Word(w), _))) => out.push(w),
                _ => break,
            }
        }
        out
    }

    /// `SET name ...` (not `SET CONSTRAINTS` / `SET TRANSACTION`) or
    /// `SELECT pg_catalog.set_config(...)`.
    pub fn is_setting(&self) -> bool {
        let tokens = self.tokens();
        match tokens.as_slice() {
            [Token::Word(set), Token::Word(name), ..] if set == "set" => {
                !matches!(name.as_str(), "constraints" | "transaction" | "local")
            }
            [Token::Word(select), Token::Word(schema), Token::Punct('.'), Token::Word(f), ..] => {
                select == "select" && schema == "pg_catalog" && f == "set_config"
            }
            _ => false,
        }
    }

    /// The parameter a `SET name = value` statement sets.
    pub fn setting_name(&self) -> Option<String> {
        match self.tokens().as_slice() {
            [Token::Word(set), Token::Word(name), ..] if set == "set" => Some(name.clone()),
            [Token::Word(set), Token::Quoted(name), ..] if set == "set" => Some(name.clone()),
            _ => None,
        }
    }

    /// `ALTER <object> ... OWNER TO <role>;`: the ownership statement pg_dump writes after
    /// each object, which `pg_restore --no-owner` leaves out.
    pub fn is_owner_change(&self) -> bool {
        let tokens = self.tokens();
        let n = tokens.len();
        n >= 5
            && tokens[0] == Token::Word("alter".into())
            && tokens[n - 1] == Token::Punct(';')
            && matches!(tokens[n - 2], Token::Word(_) | Token::Quoted(_))
            && tokens[n - 3] == Token::Word("to".into())
            && tokens[n - 4] == Token::Word("owner".into())
    }

    /// The relation named after the first occurrence of keyword `after` (e.g. `on` in
    /// `CREATE INDEX i ON ONLY s.t USING ...`, `references` in a foreign key), skipping
    /// `ONLY`; `(schema, name)`.
    pub fn relation_after(&self, after: &str) -> Option<(Option<String>, String)> {
        let tokens = self.tokens();
        let at = tokens
            .iter()
            .position(|t| *t == Token::Word(after.into()))?;
        let mut rest = tokens[at + 1..].iter().peekable();
        if rest.peek() == Some(&&Token::Word("only".into())) {
            rest.next();
        }
        let ident = |t: Option<&Token>| match t {
            Some(Token::Word(w)) => Some(w.clone()),
            Some(Token::Quoted(q)) => Some(q.clone()),
            _ => None,
        };
        let first = ident(rest.next())?;
        if rest.peek() == Some(&&Token::Punct('.')) {
            rest.next();
            let second = ident(rest.next())?;
            Some((Some(first), second))
        } else {
            Some((None, first))
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn settings_the_server_does_not_know_are_left_out_but_bodies_are_untouched() {
        let text = "--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\n\
SET transaction_timeout = 0;\nSET client_encoding = 'UTF8';\n\n--\n\
-- Name: f(); Type: FUNCTION; Schema: public; Owner: postgres\n--\n\n\
CREATE FUNCTION public.f() RETURNS void LANGUAGE sql AS $$\nSET transaction_timeout = 0;\n$$;\n\n\
SET transaction_timeout = 5;   \nSET default_tablespace = '';\n";
        let known = |name: &str| name != "transaction_timeout";
        let (out, script, dropped) = without_settings(text, &known).expect("parses");
        assert_eq!(dropped, vec!["transaction_timeout", "transaction_timeout"]);
        assert_eq!(
            out,
            text.replacen("SET transaction_timeout = 0;\n", "", 1)
                .replace("SET transaction_timeout = 5;   \n", "")
        );
        assert!(
            out.contains("AS $$\nSET transaction_timeout = 0;\n$$;"),
            "{out}"
        );
        let (same, _, none) = without_settings(text, &|_| true).expect("parses");
        assert_eq!((same.as_str(), none.len()), (text, 0));
        assert_eq!(Script::parse(&out).expect("parses").entries().count(), 1);
        assert_eq!(script, Script::parse(&out).expect("parses"));
    }
    use super::*;

    const SAMPLE: &str = r#"--
-- PostgreSQL database dump
--

\restrict abc123

-- Dumped from database version 15.18

SET statement_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;

--
-- Name: app; Type: SCHEMA; Schema: -; Owner: alice
--

CREATE SCHEMA app;


ALTER SCHEMA app OWNER TO alice;

--
-- Name: EXTENSION citext; Type: COMMENT; Schema: -; Owner: 
--

COMMENT ON EXTENSION citext IS 'data type; for case-insensitive strings';

--
-- Name: f(); Type: FUNCTION; Schema: app; Owner: alice
--

CREATE FUNCTION app.f() RETURNS text
    LANGUAGE sql
    AS $_$ SELECT 'a;b'; -- not the end
--
-- Name: fake; Type: TABLE; Schema: app; Owner: eve
--
SELECT $1 $_$;


ALTER FUNCTION app.f() OWNER TO "Alice Smith";

--
-- Name: g(); Type: FUNCTION; Schema: app; Owner: alice
--

CREATE FUNCTION app.g() RETURNS integer
    LANGUAGE sql
    BEGIN ATOMIC
 SELECT CASE WHEN true THEN 1 ELSE 2 END;
 SELECT 3;
END;

SET default_tablespace = '';

--
-- Name: Order Lines Order Lines_pkey; Type: CONSTRAINT; Schema: Sales; Owner: alice
--

ALTER TABLE ONLY "Sales"."Order Lines"
    ADD CONSTRAINT "Order Lines_pkey" PRIMARY KEY ("Order", "Line");

--
-- Name: TABLE t; Type: ACL; Schema: app; Owner: alice
--

GRANT SELECT ON TABLE app.t TO bob;

--
-- Name: t d; Type: DEFAULT; Schema: app; Owner: alice
--

ALTER TABLE ONLY app.t ALTER COLUMN d SET DEFAULT E'it''s \' /* not a comment';

\unrestrict abc123
"#;

    #[test]
    fn the_digest_leaves_out_only_the_scripts_own_restrict_key() {
        let digest = |text: &str| {
            Script::parse(text)
                .expect("parses")
                .digest_without_restrict_key(text)
        };
        let again = SAMPLE.replace("abc123", "zz9");
        assert_eq!(digest(SAMPLE), digest(&again));
        // Anything else that differs is a different script.
        assert_ne!(digest(SAMPLE), digest(&SAMPLE.replace("'a;b'", "'a;c'")));
        assert_ne!(
            digest(SAMPLE),
            digest(&SAMPLE.replace("\\restrict abc123\n", ""))
        );
        // A body line that looks like the meta-command is text, whatever its key.
        let body = |key: &str| {
            format!(
                "\\restrict k\n--\n-- Name: f(); Type: FUNCTION; Schema: app; Owner: alice\n--\n\n\
                 CREATE FUNCTION app.f() RETURNS text LANGUAGE sql AS $$\n\\restrict {key}\n$$;\n\
                 \n\\unrestrict k\n"
            )
        };
        assert_eq!(
            Script::parse(&body("a")).expect("parses").entries().count(),
            1
        );
        assert_ne!(digest(&body("a")), digest(&body("b")));
    }

    #[test]
    fn splits_a_dump_into_settings_meta_and_entries() {
        let script = Script::parse(SAMPLE).expect("parses");
        let labels: Vec<String> = script.entries().map(Entry::label).collect();
        assert_eq!(
            labels,
            vec![
                "SCHEMA app",
                "COMMENT EXTENSION citext",
                "FUNCTION app.f()",
                "FUNCTION app.g()",
                "CONSTRAINT Order Lines Order Lines_pkey (schema Sales)",
                "ACL TABLE t (schema app)",
                "DEFAULT t d (schema app)",
            ]
        );
        let metas: Vec<&str> = script
            .items
            .iter()
            .filter_map(|i| match i {
                Item::Meta(m) => Some(m.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(metas, vec!["\\restrict abc123", "\\unrestrict abc123"]);
        let settings: Vec<String> = script
            .items
            .iter()
            .filter_map(|i| match i {
                Item::Setting(s) => Some(s.text.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(settings.len(), 4);
        assert_eq!(settings[3], "SET default_tablespace = '';");

        let entries: Vec<&Entry> = script.entries().collect();
        assert_eq!(entries[0].owner.as_deref(), Some("alice"));
        assert_eq!(entries[1].owner, None);
        assert_eq!(entries[1].schema, None);
        // The function body holds a ; and a fake header: one statement plus the owner.
        assert_eq!(entries[2].statements.len(), 2);
        assert!(entries[2].statements[0].text.ends_with("SELECT $1 $_$;"));
        assert!(entries[2].statements[1].is_owner_change());
        assert!(!entries[2].statements[0].is_owner_change());
        // BEGIN ATOMIC ... END (with a CASE ... END inside) is one statement.
        assert_eq!(entries[3].statements.len(), 1);
        assert!(entries[3].statements[0].text.ends_with("END;"));
        assert!(entries[5].is_privileges());
        assert!(entries[6].statements[0]
            .text
            .ends_with("/* not a comment';"));
    }

    #[test]
    fn statements_know_their_relations() {
        let s = |t: &str| Statement { text: t.into() };
        assert_eq!(
            s("CREATE UNIQUE INDEX measurements_key ON ONLY app.measurements USING btree (id);")
                .relation_after("on"),
            Some((Some("app".into()), "measurements".into()))
        );
        assert_eq!(
            s("ALTER TABLE ONLY app.b ADD CONSTRAINT x FOREIGN KEY (a_id) REFERENCES \"App\".\"A b\"(id);")
                .relation_after("references"),
            Some((Some("App".into()), "A b".into()))
        );
        assert_eq!(
            s("SET transaction_timeout = 0;").setting_name().as_deref(),
            Some("transaction_timeout")
        );
        assert!(!s("SET CONSTRAINTS ALL DEFERRED;").is_setting());
        assert!(s("ALTER TABLE app.\"T\" OWNER TO postgres;").is_owner_change());
        assert!(!s("ALTER TABLE app.t ALTER COLUMN owner SET DEFAULT 'to';").is_owner_change());
    }

    /// pg_dump writes an entry's tablespace before its header: the setting must run
    /// before that entry, not before the one whose statements it follows.
    #[test]
    fn a_setting_between_entries_belongs_to_the_entries_after_it() {
        let script = Script::parse(
            "--\n-- Name: a; Type: INDEX; Schema: s; Owner: o\n--\n\nCREATE INDEX a ON s.t (x);\n\n\
             SET default_tablespace = fast;\n\n\
             --\n-- Name: b; Type: INDEX; Schema: s; Owner: o; Tablespace: fast\n--\n\nCREATE INDEX b ON s.t (y);\n",
        )
        .expect("parses");
        let order: Vec<String> = script
            .items
            .iter()
            .map(|item| match item {
                Item::Entry(e) => e.name.clone(),
                Item::Setting(s) => s.text.clone(),
                Item::Meta(m) => m.clone(),
            })
            .collect();
        assert_eq!(order, ["a", "SET default_tablespace = fast;", "b"]);
    }

    #[test]
    fn bad_scripts_say_where() {
        assert_eq!(
            Script::parse("SELECT 1;\nSELECT 'open;\n"),
            Err(ScriptError::Unterminated {
                what: "string literal",
                line: 2
            })
        );
        assert!(matches!(
            Script::parse("SELECT 1"),
            Err(ScriptError::Unterminated { .. })
        ));
        assert!(matches!(
            Script::parse("COPY t (a) FROM stdin;\n1\n\\.\n"),
            Err(ScriptError::UnexpectedData { line: 1 })
        ));
    }

    proptest::proptest! {
        /// Whatever the bodies hold, a script of entries whose statements are dollar-quoted
        /// or single-quoted literals splits back into exactly those statements.
        #[test]
        fn literal_bodies_never_split(bodies in proptest::collection::vec("[ -~\n]{0,40}", 1..6)) {
            let mut text = String::from("SET x = 1;\n");
            let mut expected = Vec::new();
            for (i, body) in bodies.iter().enumerate() {
                let tag = if body.contains("$q$") { None } else { Some("$q$") };
                let statement = match tag {
                    Some(tag) => format!("SELECT {tag}{body}{tag};"),
                    None => format!("SELECT '{}';", body.replace('\'', "''")),
                };
                text.push_str(&format!("--\n-- Name: e{i}; Type: FUNCTION; Schema: s; Owner: o\n--\n\n{statement}\n\n"));
                expected.push(statement);
            }
            let script = Script::parse(&text).expect("parses");
            let got: Vec<String> = script.entries().flat_map(|e| e.statements.iter().map(|s| s.text.clone())).collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }
}
