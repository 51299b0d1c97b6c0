//! The synthetic tasks: five families of five tasks. Tasks of one family read the same kind
//! of input and write the same kind of answer, but disagree on which answer: merging their
//! experts blindly averages rules that contradict each other, as in the paper's Flan
//! experts. A short tag at the start of each prompt names the task, as Flan's instructions
//! do, so a router can tell tasks apart.

use rand::Rng;

/// One task: its family, its name (also its tag and its expert's name) and its rule.
pub struct Task {
    pub family: &'static str,
    pub name: &'static str,
    rule: fn(&Input) -> String,
}

/// A task input: the family decides which kind is drawn.
#[derive(Debug, Clone)]
pub enum Input {
    Word(String),
    Pair(u32, u32),
    Words(Vec<String>),
    Number(u32),
}

impl Input {
    fn text(&self) -> String {
        match self {
            Input::Word(w) => w.clone(),
            Input::Pair(a, b) => format!("{a},{b}"),
            Input::Words(ws) => ws.join(" "),
            Input::Number(n) => n.to_string(),
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
            Input::Pair(a, b) => (*a, *b),
            _ => unreachable!("family guarantees a pair"),
        }
    }

    fn words(&self) -> &[String] {
        match self {
            Input::Words(ws) => ws,
            _ => unreachable!("family guarantees words"),
        }
    }
}

fn shift(c: char, by: u8) -> char {
    (b'a' + (c as u8 - b'a' + by) % 26) as char
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// All tasks, grouped by family, in a fixed order.
pub fn all() -> Vec<Task> {
    vec![
        // Strings: a lowercase word in, a transformed word out.
        Task {
            family: "strings",
            name: "reverse",
            rule: |i| i.word().chars().rev().collect(),
        },
        Task {
            family: "strings",
            name: "upper",
            rule: |i| i.word().to_uppercase(),
        },
        Task {
            family: "strings",
            name: "rot13",
            rule: |i| i.word().chars().map(|c| shift(c, 13)).collect(),
        },
        Task {
            family: "strings",
            name: "shift1",
            rule: |i| i.word().chars().map(|c| shift(c, 1)).collect(),
        },
        Task {
            family: "strings",
            name: "sorted",
            rule: |i| {
                let mut cs: Vec<char> = i.word().chars().collect();
                cs.sort_unstable();
                cs.into_iter().collect()
            },
        },
        // Arithmetic: two numbers in, one number out.
        Task {
            family: "arithmetic",
            name: "add",
            rule: |i| {
                let (a, b) = i.pair();
                (a + b).to_string()
            },
        },
        Task {
            family: "arithmetic",
            name: "diff",
            rule: |i| {
                let (a, b) = i.pair();
                a.abs_diff(b).to_string()
            },
        },
        Task {
            family: "arithmetic",
            name: "max",
            rule: |i| {
                let (a, b) = i.pair();
                a.max(b).to_string()
            },
        },
        Task {
            family: "arithmetic",
            name: "min",
            rule: |i| {
                let (a, b) = i.pair();
                a.min(b).to_string()
            },
        },
        Task {
            family: "arithmetic",
            name: "swap",
            rule: |i| {
                let (a, b) = i.pair();
                format!("{b},{a}")
            },
        },
        // Extraction: a list of words in, one word (or a count) out.
        Task {
            family: "extraction",
            name: "first",
            rule: |i| i.words()[0].clone(),
        },
        Task {
            family: "extraction",
            name: "last",
            rule: |i| i.words().last().expect("non-empty").clone(),
        },
        Task {
            family: "extraction",
            name: "second",
            rule: |i| i.words()[1].clone(),
        },
        Task {
            family: "extraction",
            name: "longest",
            // The first of the longest, so the answer is unique.
            rule: |i| {
                i.words().iter().fold(String::new(), |best, w| {
                    if w.len() > best.len() {
                        w.clone()
                    } else {
                        best
                    }
                })
            },
        },
        Task {
            family: "extraction",
            name: "count",
            rule: |i| i.words().len().to_string(),
        },
        // Classification: a word in, yes or no out.
        Task {
            family: "classify",
            name: "vowel",
            rule: |i| yes_no(i.word().starts_with(['a', 'e', 'i', 'o', 'u'])),
        },
        Task {
            family: "classify",
            name: "long",
            rule: |i| yes_no(i.word().len() > 5),
        },
        Task {
            family: "classify",
            name: "has_e",
            rule: |i| yes_no(i.word().contains('e')),
        },
        Task {
            family: "classify",
            name: "ends_vowel",
            rule: |i| yes_no(i.word().ends_with(['a', 'e', 'i', 'o', 'u'])),
        },
        Task {
            family: "classify",
            name: "early",
            rule: |i| yes_no(i.word() < "n"),
        },
        // Formatting: a word in, the word wrapped or spelled out another way.
        Task {
            family: "format",
            name: "brackets",
            rule: |i| format!("[{}]", i.word()),
        },
        Task {
            family: "format",
            name: "quotes",
            rule: |i| format!("\"{}\"", i.word()),
        },
        Task {
            family: "format",
            name: "dashes",
            rule: |i| {
                i.word()
                    .chars()
                    .map(String::from)
                    .collect::<Vec<_>>()
                    .join("-")
            },
        },
        Task {
            family: "format",
            name: "twice",
            rule: |i| format!("{0}{0}", i.word()),
        },
        Task {
            family: "format",
            name: "dots",
            rule: |i| format!("..{}..", i.word()),
        },
    ]
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

const SYLLABLES: [&str; 20] = [
    "ka", "lo", "mi", "ne", "po", "ru", "sa", "te", "vi", "zo", "ba", "de", "fu", "gi", "ho", "ja",
    "el", "an", "or", "ee",
];

fn word(rng: &mut impl Rng, min: usize, max: usize) -> String {
    let mut w = String::new();
    let target = rng.random_range(min..=max);
    while w.len() < target {
        w.push_str(SYLLABLES[rng.random_range(0..SYLLABLES.len())]);
    }
    w.truncate(target);
    w
}

/// Draws an input of the kind `family` reads.
pub fn draw_input(family: &str, rng: &mut impl Rng) -> Input {
    match family {
        "strings" | "classify" | "format" => Input::Word(word(rng, 3, 7)),
        "arithmetic" => Input::Pair(rng.random_range(0..32), rng.random_range(0..32)),
        "extraction" => {
            let n = rng.random_range(2..=4);
            Input::Words((0..n).map(|_| word(rng, 2, 5)).collect())
        }
        other => unreachable!("unknown family {other}"),
    }
}

impl Task {
    /// The prompt: the task's tag, then the input, then `>`.
    pub fn prompt(&self, input: &Input) -> String {
        format!("{} {}>", self.name, input.text())
    }

    /// The right answer, newline-terminated.
    pub fn completion(&self, input: &Input) -> String {
        format!("{}\n", (self.rule)(input))
    }
}
