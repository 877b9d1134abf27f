//! The host's modules in layers, lowest first. A module uses modules of its own layer and of the
//! layers below it, never above: the test reads every `crate::` path in `src/` and fails on
//! one that runs back up, and on a module that is in no layer.

/// Layer name, and the top-level modules in it: each layer above the leaves is a folder.
const LAYERS: &[(&str, &[&str])] = &[
    // Import nothing of the crate but each other.
    (
        "leaves",
        &[
            "settings",
            "http",
            "metrics",
            "logging",
            "proc_memory",
            "private_fs",
            "run_dir",
            "random",
            "clock",
            "lock",
            "allocator",
        ],
    ),
    // Where settings come from: flags, environment, config files, `[[app]]` entries.
    ("configuration", &["config"]),
    // What guests may call, and the databases behind it.
    ("capabilities", &["capabilities"]),
    // Components compiled, instantiated and run under their bounds.
    ("runtime", &["runtime"]),
    // Connections and requests.
    ("serving", &["serving"]),
    // The master and its workers, and the commands.
    ("process", &["process", "main", "layers"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// The top-level modules a source file names through `crate::`, outside comments.
fn used_modules(source: &str) -> Vec<String> {
    let mut used = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or_default();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                used.push(name);
            }
        }
    }
    used
}

#[test]
fn no_module_uses_a_layer_above_its_own() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.clone()];
    let mut violations = Vec::new();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(
                std::fs::read_dir(&path)
                    .expect("src/ is readable")
                    .map(|entry| entry.expect("a directory entry").path()),
            );
            continue;
        }
        let relative = path.strip_prefix(&src).expect("under src/");
        let module = relative
            .components()
            .next()
            .and_then(|first| first.as_os_str().to_str())
            .map(|first| first.trim_end_matches(".rs").to_owned())
            .expect("a module name");
        let Some(own) = layer_of(&module) else {
            violations.push(format!(
                "{} is in no layer (add it to LAYERS)",
                relative.display()
            ));
            continue;
        };
        let source = std::fs::read_to_string(&path).expect("a source file");
        for used in used_modules(&source) {
            match layer_of(&used) {
                Some(layer) if layer > own => violations.push(format!(
                    "{} ({}) uses crate::{used} ({})",
                    relative.display(),
                    LAYERS[own].0,
                    LAYERS[layer].0
                )),
                _ => {}
            }
        }
    }
    violations.sort();
    violations.dedup();
    assert!(
        violations.is_empty(),
        "imports that run up:\n{}",
        violations.join("\n")
    );
}
