//! The engine's inner layering, checked over its sources: the graph of `src/`'s top-level
//! modules (who names whom through `crate::`) has no cycle, and each module imports only the
//! layers ARCHITECTURE.md puts below it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first; a module may name only modules earlier in this list.
const LAYERS: &[&str] = &[
    "error", "nn", "models", "plan", "run", "train", "fit", "services",
];

/// Top-level module name → the files that make it up (`x.rs`, or everything under `x/`).
fn top_level_modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name == "lib" {
            continue;
        }
        let mut files = Vec::new();
        if path.is_dir() {
            collect_rs(&path, &mut files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
        out.entry(name).or_insert_with(Vec::new).extend(files);
    }
    out
}

fn collect_rs(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The top-level modules `text` names through `crate::x` (in `use` lines and paths, nested
/// `use crate::{a, b::c}` groups included), comments skipped.
fn named_modules(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end].split(',').collect()
            } else {
                vec![rest]
            };
            for name in names {
                let ident: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if modules.contains(&ident) {
                    out.insert(ident);
                }
            }
        }
    }
    out
}

fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = top_level_modules(src);
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(module, files)| {
            let mut deps = BTreeSet::new();
            for file in files {
                let text = std::fs::read_to_string(file).unwrap();
                deps.extend(named_modules(&text, &names));
            }
            deps.remove(module);
            (module.clone(), deps)
        })
        .collect()
}

/// A cycle of the graph, if it has one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_engines_top_level_modules_import_one_another_without_a_cycle() {
    let g = graph(&src());
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle in daemon/engine/src: {}", cycle.join(" -> "));
    }
}

#[test]
fn each_layer_imports_only_the_layers_below_it() {
    let g = graph(&src());
    let unknown: Vec<&String> = g.keys().filter(|m| !LAYERS.contains(&m.as_str())).collect();
    assert!(
        unknown.is_empty(),
        "top-level modules {unknown:?} are not in the layer list; add them (and to ARCHITECTURE.md)"
    );
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m).unwrap();
    for (module, deps) in &g {
        for dep in deps {
            assert!(
                rank(dep) < rank(module),
                "{module} imports {dep}, which is not below it (layers, bottom first: {LAYERS:?})"
            );
        }
    }
}

#[test]
fn the_checker_sees_a_cycle_and_nested_imports() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("low")).unwrap();
    std::fs::write(
        dir.path().join("low/mod.rs"),
        "// crate::high in a comment is not an import\nuse crate::{error, high::X};\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("high.rs"), "fn f() { crate::low::g() }\n").unwrap();
    std::fs::write(dir.path().join("error.rs"), "").unwrap();
    let g = graph(dir.path());
    assert_eq!(g["low"], BTreeSet::from(["error".into(), "high".into()]));
    assert_eq!(
        find_cycle(&g),
        Some(vec!["high".to_string(), "low".into(), "high".into()])
    );
    std::fs::write(dir.path().join("low/mod.rs"), "use crate::error;\n").unwrap();
    assert_eq!(find_cycle(&graph(dir.path())), None);
}
