//! The synthetic tasks: five families of five tasks, built like Lots-of-LoRAs' library of
//! Natural Instructions tasks.
//!
//! - Tasks of one family read the same kind of input and write the same kind of answer, but
//!   disagree on which answer: merging their experts blindly averages rules that contradict
//!   each other, as in the paper's Flan experts.
//! - Each task reads its own *source* (its dataset): words from its own letters, numbers
//!   from its own range written with its own separator. A router can tell tasks apart by
//!   what they read, as Arrow does by the inputs an expert was trained on.
//! - Two tasks of each family are *twins* of another task: the same source, rule and
//!   instruction collected again, as Natural Instructions holds one dataset and instruction
//!   in several tasks. Their experts are near-duplicates, which is why a greedy subset of
//!   the library suffices. (A twin under a new tag would not do: on this small model an
//!   expert keys on its tag, and one trained on `reverse` ignores `mirror` prompts.)
//!
//! A short tag at the start of each prompt names the task's instruction, as Flan's
//! instructions do; a twin carries the tag of the task it twins.

use rand::Rng;

/// One task: its family, its name (also its expert's name and, unless it is a twin, its
/// tag), its rule and the source its inputs are drawn from.
pub struct Task {
    pub family: &'static str,
    pub name: &'static str,
    /// The task whose source, rule and tag this one shares, if it is a twin.
    pub twin_of: Option<&'static str>,
    source: Source,
    rule: fn(&Input) -> String,
}

/// A task input: the family decides which kind is drawn.
#[derive(Debug, Clone)]
pub enum Input {
    Word(String),
    /// Two numbers and the separator the source writes between them.
    Pair(u32, u32, char),
    Words(Vec<String>),
}

impl Input {
    pub fn text(&self) -> String {
        match self {
            Input::Word(w) => w.clone(),
            Input::Pair(a, b, sep) => format!("{a}{sep}{b}"),
            Input::Words(ws) => ws.join(" "),
        }
    }

    fn word(&self) -> &str {
        match self {
            Input::Word(w) => w,
            _ => unreachable!("family guarantees a word"),
        }
    }

    fn pair(&self) -> (u32, u32) {
        match self {
            Input::Pair(a, b, _) => (*a, *b),
            _ => unreachable!("family guarantees a pair"),
        }
    }

    fn words(&self) -> &[String] {
        match self {
            Input::Word(_) | Input::Pair(..) => unreachable!("family guarantees words"),
            Input::Words(ws) => ws,
        }
    }
}

/// Where a task's inputs come from: its "dataset".
#[derive(Debug, Clone, Copy)]
enum Source {
    /// Words whose consonants are these letters.
    Words { consonants: &'static str },
    /// Lists of two to four such words.
    Lists { consonants: &'static str },
    /// Two numbers in `from..from + 32`, written with `sep` between them.
    Pairs { from: u32, sep: char },
}

fn shift(c: char, by: u8) -> char {
    (b'a' + (c as u8 - b'a' + by) % 26) as char
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

fn reverse(i: &Input) -> String {
    i.word().chars().rev().collect()
}

fn upper(i: &Input) -> String {
    i.word().to_uppercase()
}

fn add(i: &Input) -> String {
    let (a, b) = i.pair();
    (a + b).to_string()
}

fn max(i: &Input) -> String {
    let (a, b) = i.pair();
    a.max(b).to_string()
}

fn first(i: &Input) -> String {
    i.words()[0].clone()
}

fn count(i: &Input) -> String {
    i.words().len().to_string()
}

fn starts_with_vowel(i: &Input) -> String {
    yes_no(i.word().starts_with(VOWELS))
}

fn long(i: &Input) -> String {
    yes_no(i.word().len() > 5)
}

fn brackets(i: &Input) -> String {
    format!("[{}]", i.word())
}

fn dashes(i: &Input) -> String {
    i.word()
        .chars()
        .map(String::from)
        .collect::<Vec<_>>()
        .join("-")
}

const VOWELS: [char; 5] = ['a', 'e', 'i', 'o', 'u'];

/// A task with its own source.
fn task(
    family: &'static str,
    name: &'static str,
    source: Source,
    rule: fn(&Input) -> String,
) -> Task {
    Task {
        family,
        name,
        twin_of: None,
        source,
        rule,
    }
}

/// `name`, the same task as `of` under another tag.
fn twin(of: &Task, name: &'static str) -> Task {
    Task {
        family: of.family,
        name,
        twin_of: Some(of.name),
        source: of.source,
        rule: of.rule,
    }
}

/// All tasks, grouped by family, in a fixed order: three tasks of their own, then the twins
/// of the first two.
pub fn all() -> Vec<Task> {
    let words = |consonants| Source::Words { consonants };
    let lists = |consonants| Source::Lists { consonants };
    let pairs = |from, sep| Source::Pairs { from, sep };
    let families: [[Task; 3]; 5] = [
        // Strings: a lowercase word in, a transformed word out.
        [
            task("strings", "reverse", words("bdkm"), reverse),
            task("strings", "upper", words("lnpr"), upper),
            task("strings", "rot13", words("stvz"), |i| {
                i.word().chars().map(|c| shift(c, 13)).collect()
            }),
        ],
        // Arithmetic: two numbers in, one number out.
        [
            task("arithmetic", "add", pairs(0, ','), add),
            task("arithmetic", "max", pairs(32, ';'), max),
            task("arithmetic", "diff", pairs(64, ':'), |i| {
                let (a, b) = i.pair();
                a.abs_diff(b).to_string()
            }),
        ],
        // Extraction: a list of words in, one word (or a count) out.
        [
            task("extraction", "first", lists("fgjw"), first),
            task("extraction", "count", lists("bhnt"), count),
            task("extraction", "last", lists("cdlp"), |i| {
                i.words().last().expect("non-empty").clone()
            }),
        ],
        // Classification: a word in, yes or no out.
        [
            task("classify", "vowel", words("cgsw"), starts_with_vowel),
            task("classify", "long", words("fhmv"), long),
            task("classify", "has_e", words("jkrt"), |i| {
                yes_no(i.word().contains('e'))
            }),
        ],
        // Formatting: a word in, the word wrapped or spelled out another way.
        [
            task("format", "brackets", words("dgpz"), brackets),
            task("format", "dashes", words("bklw"), dashes),
            task("format", "quotes", words("fmns"), |i| {
                format!("\"{}\"", i.word())
            }),
        ],
    ];
    let twin_names = [
        ["reverse-2", "upper-2"],
        ["add-2", "max-2"],
        ["first-2", "count-2"],
        ["vowel-2", "long-2"],
        ["brackets-2", "dashes-2"],
    ];
    let mut out = Vec::new();
    for (tasks, names) in families.into_iter().zip(twin_names) {
        let twins: Vec<Task> = names
            .iter()
            .zip(&tasks)
            .map(|(name, of)| twin(of, name))
            .collect();
        out.extend(tasks);
        out.extend(twins);
    }
    out
}

/// The families, in order.
pub fn families() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for t in all() {
        if !out.contains(&t.family) {
            out.push(t.family);
        }
    }
    out
}

/// A word of `min..=max` letters from syllables of `consonants` and vowels: mostly
/// consonant-vowel, a third of the syllables vowel-consonant (so some words start with a
/// vowel and some end with a consonant).
fn word(rng: &mut impl Rng, consonants: &str, min: usize, max: usize) -> String {
    let consonants: Vec<char> = consonants.chars().collect();
    let mut w = String::new();
    let target = rng.random_range(min..=max);
    while w.len() < target {
        let c = consonants[rng.random_range(0..consonants.len())];
        let v = VOWELS[rng.random_range(0..VOWELS.len())];
        if rng.random_range(0..3) == 0 {
            w.extend([v, c]);
        } else {
            w.extend([c, v]);
        }
    }
    w.truncate(target);
    w
}

impl Task {
    /// The instruction at the start of its prompts: its name, or its twin's.
    pub fn tag(&self) -> &'static str {
        self.twin_of.unwrap_or(self.name)
    }

    /// The prompt: the task's tag, then the input, then `>`.
    pub fn prompt(&self, input: &Input) -> String {
        format!("{} {}>", self.tag(), input.text())
    }

    /// The right answer, newline-terminated.
    pub fn completion(&self, input: &Input) -> String {
        format!("{}\n", (self.rule)(input))
    }

    /// Draws an input from this task's source.
    pub fn draw_input(&self, rng: &mut impl Rng) -> Input {
        match self.source {
            Source::Words { consonants } => Input::Word(word(rng, consonants, 3, 7)),
            Source::Lists { consonants } => {
                let n = rng.random_range(2..=4);
                Input::Words((0..n).map(|_| word(rng, consonants, 2, 5)).collect())
            }
            Source::Pairs { from, sep } => Input::Pair(
                rng.random_range(from..from + 32),
                rng.random_range(from..from + 32),
                sep,
            ),
        }
    }
}
