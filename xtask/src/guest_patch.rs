//! Patches to third-party guest drivers, carried in `guest-patches/<driver>/` as unified
//! diffs (`git format-patch` files, paths relative to the upstream repository, e.g.
//! `a/driver/virtio_media_driver.c`) and applied by the xtask to its build copy of the
//! driver, never to `../shared`.
//!
//! Applying is strict, so that a driver never builds silently unpatched or patched in the
//! wrong place: every hunk's old lines (context and removals) must occur exactly once in
//! the file as it stands, with no fuzz and no offset search beyond that; anything else is
//! an error that names the patch, the file and the hunk.

use std::fs;
use std::path::{Path, PathBuf};

use crate::util::Result;

/// One hunk: the lines it expects and the lines it leaves, each with its newline.
#[derive(Debug, PartialEq, Eq)]
struct Hunk {
    /// Its `@@ ... @@` header, for errors.
    header: String,
    old: Vec<String>,
    new: Vec<String>,
}

/// The hunks of one file of a patch.
#[derive(Debug, PartialEq, Eq)]
pub struct FilePatch {
    /// The file's path with `b/` and `strip` leading folders removed.
    pub path: String,
    hunks: Vec<Hunk>,
}

/// `n` of `-n,m` or `+n,m`: the line count `m` (1 when absent).
fn count(range: &str) -> Option<usize> {
    match range.split_once(',') {
        Some((_, n)) => n.parse().ok(),
        None => range.parse::<usize>().ok().map(|_| 1),
    }
}

/// The files and hunks of unified diff `text`; `prefix` is the folder its paths start
/// with after `b/` (e.g. `driver/`), removed from [`FilePatch::path`]. Text before the
/// first `--- ` line (a mail header, a description, a diffstat) is ignored.
pub fn parse(text: &str, prefix: &str) -> Result<Vec<FilePatch>> {
    let mut files: Vec<FilePatch> = Vec::new();
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("--- ") {
            let Some(plus) = lines.next().filter(|l| l.starts_with("+++ ")) else {
                return Err(format!("a `{}` line without a `+++` line", line.trim_end()));
            };
            let target = plus[4..].trim_end().split('\t').next().unwrap_or_default();
            let path = target
                .strip_prefix("b/")
                .and_then(|p| p.strip_prefix(prefix))
                .filter(|p| !p.is_empty() && !p.contains('/'))
                .ok_or_else(|| {
                    format!("patched file {target:?} is not b/{prefix}<file of the driver>")
                })?;
            files.push(FilePatch {
                path: path.to_string(),
                hunks: Vec::new(),
            });
        } else if line.starts_with("@@ ") {
            let header = line.trim_end().to_string();
            let file = files
                .last_mut()
                .ok_or_else(|| format!("hunk {header:?} before any `---`/`+++` lines"))?;
            let mut ranges = header.split_whitespace().skip(1);
            let (Some(old_n), Some(new_n)) = (
                ranges
                    .next()
                    .and_then(|r| r.strip_prefix('-'))
                    .and_then(count),
                ranges
                    .next()
                    .and_then(|r| r.strip_prefix('+'))
                    .and_then(count),
            ) else {
                return Err(format!("hunk header {header:?} is not `@@ -a,b +c,d @@`"));
            };
            let (mut old, mut new) = (Vec::new(), Vec::new());
            while old.len() < old_n || new.len() < new_n {
                let Some(l) = lines.next() else {
                    return Err(format!(
                        "hunk {header:?} ends after {} of {old_n} old and {} of {new_n} new lines",
                        old.len(),
                        new.len()
                    ));
                };
                // A blank context line whose leading space an editor removed.
                let (tag, body) = if l == "\n" {
                    (' ', "\n")
                } else {
                    let mut c = l.chars();
                    (c.next().unwrap_or(' '), c.as_str())
                };
                match tag {
                    ' ' => {
                        old.push(body.to_string());
                        new.push(body.to_string());
                    }
                    '-' => old.push(body.to_string()),
                    '+' => new.push(body.to_string()),
                    _ => {
                        return Err(format!(
                            "hunk {header:?}: line {:?} is not context, removal or addition",
                            l.trim_end()
                        ))
                    }
                }
                if !body.ends_with('\n') || lines.peek().is_some_and(|n| n.starts_with('\\')) {
                    return Err(format!(
                        "hunk {header:?} touches a last line without a newline (not handled)"
                    ));
                }
            }
            if old.len() != old_n || new.len() != new_n {
                return Err(format!(
                    "hunk {header:?} has {} old and {} new lines, its header says {old_n} and {new_n}",
                    old.len(),
                    new.len()
                ));
            }
            file.hunks.push(Hunk { header, old, new });
        }
    }
    if files.is_empty() || files.iter().any(|f| f.hunks.is_empty()) {
        return Err("no file with hunks in the patch".into());
    }
    Ok(files)
}

/// Where `needle` (a run of lines) occurs in `hay`, as line indices.
fn positions(hay: &[String], needle: &[String]) -> Vec<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return Vec::new();
    }
    (0..=hay.len() - needle.len())
        .filter(|&i| hay[i..i + needle.len()] == *needle)
        .collect()
}

/// `source` with the hunks of `file` applied, in order; an error unless each hunk's old
/// lines occur exactly once.
pub fn apply(source: &str, file: &FilePatch) -> Result<String> {
    let mut lines: Vec<String> = source.split_inclusive('\n').map(str::to_string).collect();
    for (i, h) in file.hunks.iter().enumerate() {
        match positions(&lines, &h.old)[..] {
            [at] => {
                lines.splice(at..at + h.old.len(), h.new.iter().cloned());
            }
            [] => {
                let done = positions(&lines, &h.new).len() == 1;
                return Err(format!(
                    "hunk {} of {} ({}) does not apply to {}: its old lines are not there{}",
                    i + 1,
                    file.hunks.len(),
                    h.header,
                    file.path,
                    if done {
                        " (its new lines are: applied already?)"
                    } else {
                        " (the driver changed: update the patch)"
                    }
                ));
            }
            ref many => {
                return Err(format!(
                    "hunk {} of {} ({}) is ambiguous in {}: its old lines occur at lines {}",
                    i + 1,
                    file.hunks.len(),
                    h.header,
                    file.path,
                    many.iter()
                        .map(|l| (l + 1).to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        }
    }
    Ok(lines.concat())
}

/// The `*.patch` files of `dir`, sorted by name (none when `dir` does not exist).
pub fn patch_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("read {}: {e}", dir.display())),
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "patch") && p.is_file())
        .collect();
    found.sort();
    Ok(found)
}

/// Applies the patch `text` (named `name` in errors) to `files` (name, contents): every
/// file it names must be there and take every hunk.
pub fn apply_to(
    files: &mut [(String, Vec<u8>)],
    name: &str,
    text: &str,
    prefix: &str,
) -> Result<()> {
    for fp in parse(text, prefix).map_err(|e| format!("patch {name}: {e}"))? {
        let (_, bytes) = files
            .iter_mut()
            .find(|(n, _)| *n == fp.path)
            .ok_or_else(|| {
                format!(
                    "patch {name} changes {}, which the driver does not have",
                    fp.path
                )
            })?;
        let source = std::str::from_utf8(bytes)
            .map_err(|e| format!("patch {name}: {} is not UTF-8: {e}", fp.path))?;
        *bytes = apply(source, &fp)
            .map_err(|e| format!("patch {name}: {e}"))?
            .into_bytes();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "a\nb\nc\nd\ne\nf\n";

    const PATCH: &str = "From x\nSubject: [PATCH] y\n\n--- a/driver/f.c\n+++ b/driver/f.c\n\
        @@ -2,3 +2,4 @@\n b\n-c\n+C\n+C2\n d\n@@ -5,2 +6,1 @@\n e\n-f\n";

    #[test]
    fn hunks_apply_in_order() {
        let files = parse(PATCH, "driver/").unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, "f.c");
        assert_eq!(apply(SOURCE, &files[0]).unwrap(), "a\nb\nC\nC2\nd\ne\n");
    }

    #[test]
    fn a_hunk_that_does_not_match_exactly_once_is_an_error() {
        let fp = &parse(PATCH, "driver/").unwrap()[0];
        // Applied already.
        let e = apply("a\nb\nC\nC2\nd\ne\n", fp).unwrap_err();
        assert!(
            e.contains("hunk 1 of 2") && e.contains("applied already"),
            "{e}"
        );
        // The driver changed.
        let e = apply("a\nb\nX\nd\ne\nf\n", fp).unwrap_err();
        assert!(e.contains("the driver changed"), "{e}");
        // Twice.
        let e = apply("b\nc\nd\nb\nc\nd\ne\nf\n", fp).unwrap_err();
        assert!(e.contains("ambiguous") && e.contains("lines 1, 4"), "{e}");
        // The second hunk's context is gone.
        let e = apply("a\nb\nc\nd\nE\nf\n", fp).unwrap_err();
        assert!(e.contains("hunk 2 of 2"), "{e}");
    }

    #[test]
    fn malformed_patches_are_refused() {
        assert!(parse("just text\n", "driver/").is_err());
        assert!(parse("--- a/x/f.c\n+++ b/x/f.c\n@@ -1 +1 @@\n-a\n+b\n", "driver/").is_err());
        // Fewer lines than the header says.
        assert!(parse(
            "--- a/driver/f.c\n+++ b/driver/f.c\n@@ -1,3 +1,3 @@\n a\n",
            "driver/"
        )
        .is_err());
        assert!(parse("--- a/driver/f.c\n+++ b/driver/f.c\n@@ -1 +1 @@\n-a\n+b\n\\ No newline at end of file\n", "driver/").is_err());
        assert!(parse(
            "--- a/driver/f.c\n+++ b/driver/f.c\n@@ -1 +1 @@\n?a\n+b\n",
            "driver/"
        )
        .is_err());
    }

    #[test]
    fn a_patch_for_a_missing_file_is_an_error() {
        let mut files = vec![("g.c".to_string(), SOURCE.as_bytes().to_vec())];
        let e = apply_to(&mut files, "0001.patch", PATCH, "driver/").unwrap_err();
        assert!(e.contains("0001.patch") && e.contains("f.c"), "{e}");
        let mut files = vec![("f.c".to_string(), SOURCE.as_bytes().to_vec())];
        apply_to(&mut files, "0001.patch", PATCH, "driver/").unwrap();
        assert_eq!(files[0].1, b"a\nb\nC\nC2\nd\ne\n");
    }

    /// The patches in the tree parse (`media_guest`'s tests apply them to the driver).
    #[test]
    fn the_carried_virtio_media_patches_parse() {
        let dir = crate::util::workspace_root().join("guest-patches/virtio-media");
        let patches = patch_files(&dir).unwrap();
        assert!(!patches.is_empty(), "no patches in {}", dir.display());
        for p in patches {
            let text = fs::read_to_string(&p).unwrap();
            parse(&text, "driver/").unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
}
