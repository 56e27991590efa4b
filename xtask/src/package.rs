//! `cargo xtask package [--check]`: the Debian package, built with `dpkg-deb`.
//!
//! Owns: the package's layout and control data, generating its man pages and shell
//! completions (by running the built binaries' hidden `__generate`, so the pages come from
//! the real clap definitions without linking aya into xtask), and `--check`: inspecting
//! the .deb and installing, reinstalling, removing and purging it in throwaway roots (an
//! overlay over this host's Debian 12 root, and over the lab's cached dom0 root when it
//! exists), each in private mount and pid namespaces. Never touches: the host's own
//! package database or files (every install happens in an overlay's upper layer, which is
//! deleted afterwards), the product's code.
//!
//! Why dpkg-deb and not cargo-deb: dpkg-deb is part of every Debian system (nothing more
//! to build in CI), the layout needs generated files anyway (man pages, completions) and
//! hand-written maintainer scripts (the key, refusing removal while guests are protected),
//! and `--root-owner-group` gives root-owned files without fakeroot. dpkg-shlibdeps (from
//! dpkg-dev) computes the library dependencies as Debian's own packages do.
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::util;

#[derive(Args, Default)]
pub struct PackageArgs {
    /// Also inspect the .deb and install/remove/purge it in throwaway roots.
    #[arg(long)]
    pub check: bool,
}

const PACKAGE: &str = "remus";
/// Xen's tools: `remus protect` checks for them at run time (exit 3 with a message), and
/// remus-net is useful (and tested) without Xen, so they are recommended, not required:
/// apt installs Recommends by default, and a build or test host need not pull in a
/// hypervisor.
const RECOMMENDS: &str = "xen-utils-4.17 | xen-utils, xenstore-utils, kmod, procps";
const DESCRIPTION: &str = "\
transparent high availability for Xen guests (Remus, rebuilt)
 A protected guest is checkpointed to a backup host several times a second;
 everything it sends is held (an eBPF buffer on its vif) until the backup has
 acknowledged the checkpoint that produced it, and when the primary dies the
 backup copy resumes, TCP sessions included. Works with Debian's stock xl remus.
 .
 remus protect DOMAIN on the primary, remus backup DOMAIN on the backup (or the
 remus-protect@ and remus-backup@ systemd units), /etc/remus/remus.toml for
 both, remus status for both ends. remus-net is the output buffer on its own.";

fn pkg_dir() -> PathBuf {
    util::root().join("target/package")
}

fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

fn arch() -> Result<String> {
    let o = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("running dpkg --print-architecture")?;
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn run_ok(c: &mut Command) -> Result<String> {
    let o = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {c:?}"))?;
    if !o.status.success() {
        bail!(
            "{c:?} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn install(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p)?;
    }
    fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn gzip_into(src: &Path, dst: &Path) -> Result<()> {
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p)?;
    }
    let out = fs::File::create(dst)?;
    let st = Command::new("gzip")
        .args(["-9n", "-c"])
        .arg(src)
        .stdout(out)
        .status()
        .context("running gzip")?;
    if !st.success() {
        bail!("gzip {} failed", src.display());
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// `Depends:` as dpkg-shlibdeps computes it for the binaries.
fn shlib_depends(root: &Path, bins: &[&str]) -> Result<String> {
    let tmp = pkg_dir().join("shlibdeps");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(tmp.join("debian"))?;
    fs::write(
        tmp.join("debian/control"),
        "Source: remus\n\nPackage: remus\nArchitecture: any\n",
    )?;
    let mut c = Command::new("dpkg-shlibdeps");
    c.current_dir(&tmp).arg("-O");
    for b in bins {
        c.arg(format!("-e{}", root.join(b).display()));
    }
    let out = run_ok(&mut c)?;
    let _ = fs::remove_dir_all(&tmp);
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}

/// Builds the .deb; returns its path.
pub fn build() -> Result<PathBuf> {
    util::run(util::cmd("cargo").args(["build", "--release", "-p", "remus-user"]))?;
    let rel = util::root().join("target/release");
    let dir = pkg_dir();
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(&root)?;
    let pk = util::root().join("packaging");

    // Binaries, stripped as Debian ships them.
    for b in ["remus", "remus-net"] {
        let dst = root.join("usr/sbin").join(b);
        install(&rel.join(b), &dst, 0o755)?;
        run_ok(Command::new("strip").arg("--strip-unneeded").arg(&dst))?;
    }
    // Man pages and completions from the binaries themselves.
    let gen_dir = dir.join("generated");
    let _ = fs::remove_dir_all(&gen_dir);
    for b in ["remus", "remus-net"] {
        let out = gen_dir.join(b);
        run_ok(Command::new(rel.join(b)).arg("__generate").arg(&out))?;
        for e in fs::read_dir(out.join("man"))?.flatten() {
            let name = format!("{}.gz", e.file_name().to_string_lossy());
            gzip_into(&e.path(), &root.join("usr/share/man/man1").join(name))?;
        }
        let c = out.join("completions");
        install(
            &c.join("bash").join(b),
            &root.join("usr/share/bash-completion/completions").join(b),
            0o644,
        )?;
        install(
            &c.join("zsh").join(format!("_{b}")),
            &root
                .join("usr/share/zsh/vendor-completions")
                .join(format!("_{b}")),
            0o644,
        )?;
        install(
            &c.join("fish").join(format!("{b}.fish")),
            &root
                .join("usr/share/fish/vendor_completions.d")
                .join(format!("{b}.fish")),
            0o644,
        )?;
    }
    // Units, the hotplug script, the example config (a conffile), docs.
    for u in ["remus-protect@.service", "remus-backup@.service"] {
        install(
            &pk.join("systemd").join(u),
            &root.join("lib/systemd/system").join(u),
            0o644,
        )?;
    }
    install(
        &pk.join("xen/vif-remus"),
        &root.join("etc/xen/scripts/vif-remus"),
        0o755,
    )?;
    install(
        &pk.join("remus.toml"),
        &root.join("etc/remus/remus.toml"),
        0o644,
    )?;
    // The key lives here too: root only (dpkg creates the directory with this mode).
    fs::set_permissions(root.join("etc/remus"), fs::Permissions::from_mode(0o700))?;
    let doc = root.join("usr/share/doc/remus");
    install(
        &util::root().join("docs/operator.md"),
        &doc.join("operator.md"),
        0o644,
    )?;
    install(
        &util::root().join("README.md"),
        &doc.join("README.md"),
        0o644,
    )?;
    install(
        &pk.join("remus.toml"),
        &doc.join("examples/remus.toml"),
        0o644,
    )?;
    fs::write(
        doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: remus\n\nFiles: *\nCopyright: the remus developers\nLicense: GPL-2.0-only\n \
         On Debian systems, the full text of the GNU General Public License version 2\n \
         can be found in /usr/share/common-licenses/GPL-2.\n",
    )?;
    gzip_into(
        &util::root().join("CHANGELOG.md"),
        &doc.join("changelog.gz"),
    )?;

    // Control data.
    let deb = root.join("DEBIAN");
    fs::create_dir_all(&deb)?;
    for s in ["postinst", "prerm", "postrm"] {
        install(&pk.join("debian").join(s), &deb.join(s), 0o755)?;
    }
    fs::write(
        deb.join("conffiles"),
        "/etc/remus/remus.toml\n/etc/xen/scripts/vif-remus\n",
    )?;
    let depends = shlib_depends(&root, &["usr/sbin/remus", "usr/sbin/remus-net"])?;
    let size_kib = run_ok(
        Command::new("du")
            .args(["-sk", "--exclude=DEBIAN"])
            .arg(&root),
    )?
    .split_whitespace()
    .next()
    .unwrap_or("0")
    .to_string();
    let mut control = String::new();
    writeln!(control, "Package: {PACKAGE}")?;
    writeln!(control, "Version: {}", version())?;
    writeln!(control, "Architecture: {}", arch()?)?;
    writeln!(
        control,
        "Maintainer: remus developers <remus@example.invalid>"
    )?;
    writeln!(control, "Installed-Size: {size_kib}")?;
    writeln!(control, "Depends: {depends}")?;
    writeln!(control, "Recommends: {RECOMMENDS}")?;
    writeln!(control, "Section: admin")?;
    writeln!(control, "Priority: optional")?;
    writeln!(control, "Description: {DESCRIPTION}")?;
    fs::write(deb.join("control"), control)?;
    // md5sums of every file (dpkg --verify uses them).
    let mut sums = String::new();
    let mut files = Vec::new();
    walk(&root, &mut files)?;
    files.sort();
    for f in files {
        let rel = f.strip_prefix(&root)?;
        if rel.starts_with("DEBIAN") {
            continue;
        }
        let out = run_ok(Command::new("md5sum").arg(&f))?;
        let sum = out.split_whitespace().next().unwrap_or_default();
        writeln!(sums, "{sum}  {}", rel.display())?;
    }
    fs::write(deb.join("md5sums"), sums)?;

    let out = dir.join(format!("{PACKAGE}_{}_{}.deb", version(), arch()?));
    util::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&root)
            .arg(&out),
    )?;
    // A stable name for scripts and docs (`apt install ./target/package/remus.deb`).
    let stable = dir.join("remus.deb");
    let _ = fs::remove_file(&stable);
    fs::copy(&out, &stable)?;
    eprintln!("package: {}", out.display());
    println!("{}", stable.display());
    Ok(stable)
}

fn walk(d: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(d)?.flatten() {
        let p = e.path();
        if e.file_type()?.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// What the package must contain (path, mode as `dpkg-deb -c` prints it).
const EXPECTED: &[(&str, &str)] = &[
    ("./usr/sbin/remus", "-rwxr-xr-x"),
    ("./usr/sbin/remus-net", "-rwxr-xr-x"),
    ("./etc/remus/", "drwx------"),
    ("./etc/remus/remus.toml", "-rw-r--r--"),
    ("./etc/xen/scripts/vif-remus", "-rwxr-xr-x"),
    ("./lib/systemd/system/remus-protect@.service", "-rw-r--r--"),
    ("./lib/systemd/system/remus-backup@.service", "-rw-r--r--"),
    ("./usr/share/man/man1/remus.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/remus-protect.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/remus-unprotect.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/remus-status.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/remus-backup.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/remus-config.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/remus-config-check.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/remus-relay-send.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/remus-net.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/remus-net-attach.1.gz", "-rw-r--r--"),
    (
        "./usr/share/bash-completion/completions/remus",
        "-rw-r--r--",
    ),
    (
        "./usr/share/bash-completion/completions/remus-net",
        "-rw-r--r--",
    ),
    ("./usr/share/zsh/vendor-completions/_remus", "-rw-r--r--"),
    (
        "./usr/share/fish/vendor_completions.d/remus.fish",
        "-rw-r--r--",
    ),
    ("./usr/share/doc/remus/operator.md", "-rw-r--r--"),
    ("./usr/share/doc/remus/copyright", "-rw-r--r--"),
];

/// Checks `dpkg-deb -c` output: every expected path, with its mode, owned by root, and
/// nothing hidden (no `__relay-child` page). Returns the problems found.
pub fn check_contents(listing: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let rows: Vec<(&str, &str, &str)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6).then(|| (f[0], f[1], *f.last().unwrap_or(&"")))
        })
        .collect();
    for (path, mode) in EXPECTED {
        match rows.iter().find(|(_, _, p)| p == path) {
            None => problems.push(format!("missing {path}")),
            Some((m, _, _)) if m != mode => {
                problems.push(format!("{path} has mode {m}, expected {mode}"))
            }
            _ => {}
        }
    }
    for (_, owner, p) in &rows {
        if *owner != "root/root" {
            problems.push(format!("{p} is owned by {owner}, not root/root"));
        }
        if p.contains("__") {
            problems.push(format!(
                "{p}: an internal (hidden) command leaked into the package"
            ));
        }
    }
    problems
}

/// Checks `dpkg-deb -I` output (the control fields).
pub fn check_control(info: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let field = |k: &str| {
        info.lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{k}: ")))
            .map(str::trim)
    };
    if field("Package") != Some(PACKAGE) {
        problems.push(format!("Package is {:?}", field("Package")));
    }
    match field("Depends") {
        Some(d) if d.contains("libc6") => {}
        other => problems.push(format!("Depends lacks libc6: {other:?}")),
    }
    if !field("Recommends").is_some_and(|r| r.contains("xen-utils")) {
        problems.push("Recommends lacks xen-utils".into());
    }
    for s in ["postinst", "prerm", "postrm", "conffiles", "md5sums"] {
        if !info.contains(s) {
            problems.push(format!("no {s} in the control archive"));
        }
    }
    problems
}

/// The script run inside each throwaway root (as root, in its own pid namespace).
const CHROOT_TEST: &str = r#"
set -eu
fail() { echo "PACKAGE CHECK FAILED: $*" >&2; exit 1; }
mode() { stat -c %a "$1"; }
deb=/tmp/remus.deb

# 1. Fresh install: binaries, config, a fresh 0600 key in a 0700 directory.
rm -rf /etc/remus
dpkg -i "$deb" >/tmp/install.log 2>&1 || { cat /tmp/install.log; fail "dpkg -i"; }
[ "$(mode /etc/remus)" = 700 ] || fail "/etc/remus is $(mode /etc/remus)"
[ "$(mode /etc/remus/key)" = 600 ] || fail "/etc/remus/key is $(mode /etc/remus/key)"
[ "$(wc -c </etc/remus/key)" = 65 ] || fail "the key is not 64 hex digits and a newline"
/usr/sbin/remus --version >/dev/null || fail "remus --version"
/usr/sbin/remus-net --version >/dev/null || fail "remus-net --version"
/usr/sbin/remus config check >/dev/null || fail "remus config check of the shipped config"
/usr/sbin/remus protect --unsafe-unreplicated-disks --help >/dev/null || fail "remus protect lacks its flags"
for f in /lib/systemd/system/remus-protect@.service /lib/systemd/system/remus-backup@.service \
    /usr/share/man/man1/remus-protect.1.gz /usr/share/bash-completion/completions/remus \
    /etc/xen/scripts/vif-remus; do
    [ -e "$f" ] || fail "missing $f"
done
if command -v systemd-analyze >/dev/null; then
    for u in remus-protect@web.service remus-backup@web.service; do
        out=$(systemd-analyze verify "$u" 2>&1) || { echo "$out"; fail "systemd-analyze verify $u"; }
        echo "$out" | grep -q remus && { echo "$out"; fail "systemd-analyze warns about $u"; }
    done
    echo "units verified with systemd-analyze"
fi
dpkg --verify remus || fail "dpkg --verify"

# 2. Reinstall: the key is kept.
key=$(md5sum </etc/remus/key)
dpkg -i "$deb" >/tmp/install.log 2>&1 || { cat /tmp/install.log; fail "dpkg -i (again)"; }
[ "$(md5sum </etc/remus/key)" = "$key" ] || fail "reinstalling replaced the key"

# 3. Removal is refused while a guest is protected (a stand-in `remus protect`).
mkdir -p /tmp/fake && printf '#!/bin/sh\nsleep 300\n' >/tmp/fake/remus && chmod +x /tmp/fake/remus
/tmp/fake/remus protect web &
fake=$!
sleep 0.3
if dpkg -r remus >/tmp/remove.log 2>&1; then cat /tmp/remove.log; fail "removed while protecting"; fi
[ -x /usr/sbin/remus ] || fail "a refused removal still removed the binary"
st=$(dpkg-query -W -f='${db:Status-Abbrev}' remus)
# dpkg records the wish (r) but the package stays installed (i).
case "$st" in ?i*) ;; *) fail "a refused removal left remus in state '$st'" ;; esac
kill $fake; wait $fake 2>/dev/null || true

# 4. Remove: programs go, configuration stays.
dpkg -r remus >/tmp/remove.log 2>&1 || { cat /tmp/remove.log; fail "dpkg -r"; }
[ ! -e /usr/sbin/remus ] || fail "remove left /usr/sbin/remus"
[ ! -e /lib/systemd/system/remus-protect@.service ] || fail "remove left the unit"
[ -e /etc/remus/remus.toml ] && [ -e /etc/remus/key ] || fail "remove deleted the configuration"
st=$(dpkg-query -W -f='${db:Status-Abbrev}' remus)
[ "$st" = "rc " ] || fail "removed, but in state '$st', not config-files"

# 5. Purge: nothing left.
dpkg -P remus >/tmp/purge.log 2>&1 || { cat /tmp/purge.log; fail "dpkg -P"; }
[ ! -e /etc/remus ] || fail "purge left $(ls -la /etc/remus)"
[ ! -e /etc/xen/scripts/vif-remus ] || fail "purge left vif-remus"
if dpkg -s remus >/dev/null 2>&1; then fail "still known to dpkg after purge"; fi

# 6. A key that is already there is never replaced.
mkdir -m 700 /etc/remus && (umask 077; echo operator-key >/etc/remus/key)
dpkg -i "$deb" >/tmp/install.log 2>&1 || { cat /tmp/install.log; fail "dpkg -i over an existing key"; }
[ "$(cat /etc/remus/key)" = operator-key ] || fail "postinst replaced an existing key"
dpkg -P remus >/dev/null 2>&1 || fail "final purge"
echo "PACKAGE CHECK PASSED"
"#;

/// Installs and removes the package in a throwaway root whose lower layer is `lower`.
fn chroot_test(deb: &Path, lower: &Path, name: &str) -> Result<()> {
    let work = pkg_dir().join(format!("chroot-{name}"));
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(&work)?;
    let test = pkg_dir().join("chroot-test.sh");
    fs::write(&test, CHROOT_TEST)?;
    let t = work.display();
    // Private mount and pid namespaces: the tmpfs holding the overlay's upper layer,
    // /proc and /dev vanish with the namespace, and pgrep in the root sees only its own
    // processes. The upper layer lives on a tmpfs because overlayfs refuses an upper
    // directory inside its lower one (the lower one may be /).
    let script = format!(
        "set -e
         mount -t tmpfs tmpfs {t}
         mkdir -p {t}/upper/tmp {t}/work {t}/merged
         cp {deb} {t}/upper/tmp/remus.deb
         cp {test} {t}/upper/tmp/test.sh
         mount -t overlay overlay -o lowerdir={lower},upperdir={t}/upper,workdir={t}/work {t}/merged
         mount -t proc proc {t}/merged/proc
         mount --rbind /dev {t}/merged/dev
         mount -t tmpfs tmpfs {t}/merged/run
         exec chroot {t}/merged /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /bin/sh /tmp/test.sh\n",
        deb = deb.display(),
        test = test.display(),
        lower = lower.display(),
    );
    eprintln!(
        "package check: installing into an overlay over {}",
        lower.display()
    );
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--propagation",
            "private",
            "sh",
            "-c",
        ])
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .context("running unshare")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = fs::remove_dir_all(&work);
    let _ = fs::remove_file(&test);
    if !out.status.success() || !text.contains("PACKAGE CHECK PASSED") {
        bail!(
            "package check in a root over {} failed:\n{text}",
            lower.display()
        );
    }
    for l in text.lines().filter(|l| l.contains("verified")) {
        eprintln!("package check: {l}");
    }
    eprintln!(
        "package check: install, reinstall, refused removal, remove, purge: passed over {}",
        lower.display()
    );
    Ok(())
}

/// The lab's cached Debian 12 dom0 root (with Xen's tools), if one is complete.
fn lab_rootfs() -> Option<PathBuf> {
    let dir = util::cache_dir().join("lab");
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("rootfs-") && !n.ends_with(".tmp"))
                && p.join("var/lib/dpkg/status").exists()
                && p.join("usr/sbin/xl").exists()
        })
        .collect();
    v.sort();
    v.pop()
}

/// Builds, inspects, installs and removes.
pub fn check() -> Result<()> {
    if !util::is_root() {
        bail!(
            "cargo xtask package --check needs root (it mounts overlays and runs dpkg in a chroot)"
        );
    }
    let deb = build()?;
    let listing = run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    let info = run_ok(Command::new("dpkg-deb").arg("-I").arg(&deb))?;
    let mut problems = check_contents(&listing);
    problems.extend(check_control(&info));
    if !problems.is_empty() {
        bail!("the package is not right:\n  {}", problems.join("\n  "));
    }
    eprintln!(
        "package check: contents and control fields as expected ({} files)",
        listing.lines().filter(|l| !l.starts_with('d')).count()
    );
    chroot_test(&deb, Path::new("/"), "host")?;
    match lab_rootfs() {
        Some(r) => chroot_test(&deb, &r, "lab-dom0")?,
        None => eprintln!(
            "package check: no lab dom0 root cached (cargo xtask lab build makes one); checked over this host's root only"
        ),
    }
    Ok(())
}

pub fn run(a: PackageArgs) -> Result<()> {
    if a.check {
        check()
    } else {
        build().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_checked_for_paths_modes_owners_and_leaks() {
        let mut listing = String::new();
        for (p, m) in EXPECTED {
            writeln!(listing, "{m} root/root 10 2026-01-01 00:00 {p}").unwrap();
        }
        assert!(
            check_contents(&listing).is_empty(),
            "{:?}",
            check_contents(&listing)
        );
        let bad = listing
            .replace(
                "drwx------ root/root 10 2026-01-01 00:00 ./etc/remus/",
                "drwxr-xr-x root/root 10 2026-01-01 00:00 ./etc/remus/",
            )
            .replace("./usr/sbin/remus-net", "./usr/sbin/other")
            + "-rw-r--r-- me/me 1 2026-01-01 00:00 ./usr/share/man/man1/remus-__relay-child.1.gz\n";
        let p = check_contents(&bad);
        assert_eq!(p.len(), 4, "{p:?}");
    }

    #[test]
    fn control_fields_are_checked() {
        let good = " new Debian package\n Package: remus\n Depends: libc6 (>= 2.34)\n Recommends: xen-utils-4.17 | xen-utils\n postinst prerm postrm conffiles md5sums\n";
        assert!(check_control(good).is_empty());
        assert_eq!(check_control(" Package: remus\n").len(), 7);
    }

    #[test]
    fn vif_remus_cleans_only_a_vanished_vif_and_passes_the_inner_status() {
        // A stand-in inner script and remus-net record what they were asked.
        let d = tempfile_dir();
        let bin = d.join("bin");
        fs::create_dir_all(&bin).unwrap();
        let script = bin.join("vif-remus");
        fs::copy(util::root().join("packaging/xen/vif-remus"), &script).unwrap();
        fs::write(
            bin.join("fake-inner"),
            "#!/bin/sh\necho \"inner $*\" >>\"$LOG\"\nexit ${INNER_RC:-0}\n",
        )
        .unwrap();
        fs::write(
            bin.join("remus-net"),
            "#!/bin/sh\necho \"remus-net $*\" >>\"$LOG\"\n",
        )
        .unwrap();
        for f in ["fake-inner", "remus-net", "vif-remus"] {
            fs::set_permissions(bin.join(f), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let pins = d.join("pins");
        let sysnet = d.join("net");
        fs::create_dir_all(pins.join("vif3:0")).unwrap();
        fs::create_dir_all(sysnet.join("vif4.0")).unwrap();
        fs::create_dir_all(pins.join("vif4:0")).unwrap();
        let log = d.join("log");
        let run = |action: &str, vif: &str, rc: &str| {
            Command::new(&script)
                .arg(action)
                .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
                .env("REMUS_VIF_INNER", "fake-inner")
                .env("REMUS_PIN_ROOT", &pins)
                .env("REMUS_SYS_NET", &sysnet)
                .env("LOG", &log)
                .env("INNER_RC", rc)
                .env("vif", vif)
                .status()
                .unwrap()
                .code()
        };
        assert_eq!(run("online", "vif3.0", "0"), Some(0));
        assert_eq!(run("offline", "vif3.0", "0"), Some(0)); // gone, pins left: cleaned
        assert_eq!(run("offline", "vif4.0", "0"), Some(0)); // still there: left alone
        assert_eq!(run("offline", "vif5.0", "1"), Some(1)); // no pins; inner status kept
        let l = fs::read_to_string(&log).unwrap();
        assert_eq!(
            l,
            "inner online\ninner offline\nremus-net detach vif3.0\ninner offline\ninner offline\n"
        );
        let _ = fs::remove_dir_all(&d);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-package-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }
}
