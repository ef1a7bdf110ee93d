//! The command table: what Redis 7 says about every command corebuf-kv serves, and the
//! `COMMAND` command that reports it.
//!
//! Clients read this table. redis-cli builds its help and hints from `COMMAND DOCS`;
//! cluster-aware clients (redis-py's `RedisCluster`) learn from `COMMAND` where each command
//! keeps its keys, so they can send it to the node owning the key's slot; cluster mode uses
//! the same key positions to answer `-MOVED` / `-CROSSSLOT` ([`crate::cluster`]).
//!
//! The data ([`table::COMMANDS`]) is generated from Redis 7.0 by `scripts/gen-cmdtable.py`, so
//! arities, flags and key specs are Redis's exactly. A command listed here that the server
//! does not serve (yet) still answers `-ERR unknown command`: the table only describes.

mod table;

use crate::resp;

/// One command (or subcommand, named `container|sub`) as `COMMAND INFO` and `COMMAND DOCS`
/// report it.
#[derive(Debug)]
pub struct Command {
    /// Lower case; a subcommand is `container|sub`.
    pub name: &'static str,
    /// Arguments including the name; negative: at least `-arity`.
    pub arity: i32,
    /// Command flags (`write`, `readonly`, `fast`, ...).
    pub flags: &'static [&'static str],
    /// Position of the first key (0: no keys).
    pub first_key: i32,
    /// Position of the last key; negative counts from the end (-1: the last argument).
    pub last_key: i32,
    /// Distance between keys (2 for MSET's key-value pairs).
    pub step: i32,
    /// ACL categories (`@read`, `@string`, ...).
    pub acl_categories: &'static [&'static str],
    /// Hints for clients (request and response policies).
    pub tips: &'static [&'static str],
    /// Redis 7 key specifications.
    pub key_specs: &'static [KeySpec],
    /// Subcommands of a container command (`CLUSTER`, `COMMAND`, ...), sorted by name.
    pub subcommands: &'static [Command],
    /// Documentation (`COMMAND DOCS`).
    pub doc: Doc,
}

/// A Redis 7 key specification; every command here finds its keys from an index over a range.
#[derive(Debug)]
pub struct KeySpec {
    /// Free text (empty: none).
    pub notes: &'static str,
    /// Access flags (`RO`, `RW`, `OW`, `access`, `update`, ...).
    pub flags: &'static [&'static str],
    /// Position of the first key.
    pub begin_index: i32,
    /// Last key, relative to the first (0: just one key; -1: up to the last argument).
    pub last_key: i32,
    /// Distance between keys.
    pub key_step: i32,
    /// Limit of the range (0: none).
    pub limit: i32,
}

/// Documentation of a command, as `COMMAND DOCS` reports it (without the history).
#[derive(Debug)]
pub struct Doc {
    /// One line.
    pub summary: &'static str,
    /// Redis version that introduced it.
    pub since: &'static str,
    /// Group (`string`, `generic`, `connection`, `server`, `cluster`).
    pub group: &'static str,
    /// Time complexity.
    pub complexity: &'static str,
    /// `deprecated`, ...
    pub doc_flags: &'static [&'static str],
    /// Version that deprecated it (empty: not deprecated).
    pub deprecated_since: &'static str,
    /// What replaces it (empty: nothing).
    pub replaced_by: &'static str,
    /// The arguments (redis-cli renders its hints from them).
    pub arguments: &'static [Arg],
}

/// One argument in [`Doc::arguments`].
#[derive(Debug)]
pub struct Arg {
    name: &'static str,
    /// `key`, `string`, `integer`, `double`, `pattern`, `unix-time`, `pure-token`, `oneof`,
    /// `block`.
    kind: &'static str,
    key_spec_index: Option<i32>,
    token: Option<&'static str>,
    since: Option<&'static str>,
    deprecated_since: Option<&'static str>,
    optional: bool,
    multiple: bool,
    multiple_token: bool,
    arguments: &'static [Arg],
}

impl Arg {
    const fn new(name: &'static str, kind: &'static str) -> Arg {
        Arg {
            name,
            kind,
            key_spec_index: None,
            token: None,
            since: None,
            deprecated_since: None,
            optional: false,
            multiple: false,
            multiple_token: false,
            arguments: &[],
        }
    }
    const fn key_spec(self, index: i32) -> Arg {
        Arg { key_spec_index: Some(index), ..self }
    }
    const fn token(self, token: &'static str) -> Arg {
        Arg { token: Some(token), ..self }
    }
    const fn since(self, version: &'static str) -> Arg {
        Arg { since: Some(version), ..self }
    }
    #[allow(dead_code)] // emitted by the generator when Redis's docs need it
    const fn deprecated_since(self, version: &'static str) -> Arg {
        Arg { deprecated_since: Some(version), ..self }
    }
    const fn optional(self) -> Arg {
        Arg { optional: true, ..self }
    }
    const fn multiple(self) -> Arg {
        Arg { multiple: true, ..self }
    }
    #[allow(dead_code)] // emitted by the generator when Redis's docs need it
    const fn multiple_token(self) -> Arg {
        Arg { multiple_token: true, ..self }
    }
    const fn of(self, arguments: &'static [Arg]) -> Arg {
        Arg { arguments, ..self }
    }
}

/// The command named `name` (any case; `container|sub` finds a subcommand).
pub fn lookup(name: &[u8]) -> Option<&'static Command> {
    let mut lower = [0u8; 32];
    if name.len() > lower.len() {
        return None;
    }
    let lower = &mut lower[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    match lower.iter().position(|&b| b == b'|') {
        None => find(table::COMMANDS, lower),
        Some(bar) => {
            let container = find(table::COMMANDS, &lower[..bar])?;
            find(container.subcommands, lower)
        }
    }
}

fn find(commands: &'static [Command], lower: &[u8]) -> Option<&'static Command> {
    commands.binary_search_by(|c| c.name.as_bytes().cmp(lower)).ok().map(|i| &commands[i])
}

impl Command {
    /// Whether `argc` arguments (the name included) fit the arity.
    pub fn arity_ok(&self, argc: usize) -> bool {
        let argc = argc as i64;
        let arity = i64::from(self.arity);
        if arity >= 0 {
            argc == arity
        } else {
            argc >= -arity
        }
    }

    /// Positions of the keys in a command line of `argc` arguments (the name is position 0)
    /// whose arity was checked.
    pub fn key_positions(&self, argc: usize) -> impl Iterator<Item = usize> {
        let (first, step) = (self.first_key.max(0) as usize, self.step.max(1) as usize);
        let last = if self.last_key < 0 {
            argc as i64 + i64::from(self.last_key)
        } else {
            i64::from(self.last_key)
        };
        let end = if first == 0 { 0 } else { (last + 1).clamp(0, argc as i64) as usize };
        (first..end.max(first)).step_by(step)
    }
}

/// Answers `COMMAND [subcommand args...]` (`args` after the name) into `out`.
pub fn reply(out: &mut Vec<u8>, args: &[&[u8]]) {
    let Some(sub) = args.first() else {
        return info_all(out);
    };
    let sub = sub.to_ascii_lowercase();
    let rest = &args[1..];
    let arity_ok = lookup(format!("command|{}", String::from_utf8_lossy(&sub)).as_bytes())
        .map(|c| c.arity_ok(args.len() + 1));
    if arity_ok == Some(false) {
        let name = String::from_utf8_lossy(&sub);
        return resp::error(
            out,
            &format!("ERR wrong number of arguments for 'command|{name}' command"),
        );
    }
    match sub.as_slice() {
        b"count" => resp::integer(out, table::COMMANDS.len() as i64),
        b"info" if rest.is_empty() => info_all(out),
        b"info" => {
            resp::array(out, rest.len());
            for name in rest {
                match lookup(name) {
                    Some(c) => info(out, c),
                    None => resp::null(out),
                }
            }
        }
        b"docs" => {
            let found: Vec<&Command> = if rest.is_empty() {
                table::COMMANDS.iter().collect()
            } else {
                rest.iter().filter_map(|n| lookup(n)).collect()
            };
            resp::array(out, 2 * found.len());
            for c in found {
                resp::bulk(out, c.name.as_bytes());
                doc(out, c);
            }
        }
        b"list" if rest.is_empty() => {
            resp::array(out, table::COMMANDS.len());
            for c in table::COMMANDS {
                resp::bulk(out, c.name.as_bytes());
            }
        }
        b"list" => resp::error(out, "ERR COMMAND LIST FILTERBY is not supported by corebuf-kv"),
        b"getkeys" => getkeys(out, rest),
        b"help" => {
            let lines = [
                "COMMAND <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "(no subcommand)",
                "    Return details about all commands.",
                "COUNT",
                "    Return the total number of commands.",
                "DOCS [<command-name> ...]",
                "    Return documentation details about multiple commands.",
                "GETKEYS <full-command>",
                "    Return the keys from a full command.",
                "INFO [<command-name> ...]",
                "    Return details about multiple commands.",
                "LIST",
                "    Return a list of all commands.",
                "HELP",
                "    Print this help.",
            ];
            resp::array(out, lines.len());
            for line in lines {
                resp::simple(out, line);
            }
        }
        _ => {
            let shown = String::from_utf8_lossy(args[0]);
            resp::error(out, &format!("ERR unknown subcommand '{shown}'. Try COMMAND HELP."))
        }
    }
}

fn info_all(out: &mut Vec<u8>) {
    resp::array(out, table::COMMANDS.len());
    for c in table::COMMANDS {
        info(out, c);
    }
}

/// `COMMAND GETKEYS command args...`.
fn getkeys(out: &mut Vec<u8>, argv: &[&[u8]]) {
    let Some(mut command) = argv.first().and_then(|n| lookup(n)) else {
        return resp::error(out, "ERR Invalid command specified");
    };
    if !command.subcommands.is_empty() && argv.len() > 1 {
        let name = format!("{}|{}", command.name, String::from_utf8_lossy(argv[1]));
        match lookup(name.as_bytes()) {
            Some(sub) => command = sub,
            None => return resp::error(out, "ERR Invalid command specified"),
        }
    }
    if !command.arity_ok(argv.len()) {
        return resp::error(out, "ERR Invalid number of arguments specified for command");
    }
    let keys: Vec<usize> = command.key_positions(argv.len()).collect();
    if keys.is_empty() {
        return resp::error(out, "ERR The command has no key arguments");
    }
    resp::array(out, keys.len());
    for at in keys {
        resp::bulk(out, argv[at]);
    }
}

fn simple_strings(out: &mut Vec<u8>, items: &[&str]) {
    resp::array(out, items.len());
    for item in items {
        resp::simple(out, item);
    }
}

/// One `COMMAND INFO` entry: Redis 7's ten fields.
fn info(out: &mut Vec<u8>, c: &Command) {
    resp::array(out, 10);
    resp::bulk(out, c.name.as_bytes());
    resp::integer(out, c.arity.into());
    simple_strings(out, c.flags);
    resp::integer(out, c.first_key.into());
    resp::integer(out, c.last_key.into());
    resp::integer(out, c.step.into());
    simple_strings(out, c.acl_categories);
    resp::array(out, c.tips.len());
    for tip in c.tips {
        resp::bulk(out, tip.as_bytes());
    }
    resp::array(out, c.key_specs.len());
    for spec in c.key_specs {
        let notes = !spec.notes.is_empty();
        resp::array(out, if notes { 8 } else { 6 });
        if notes {
            resp::bulk(out, b"notes");
            resp::bulk(out, spec.notes.as_bytes());
        }
        resp::bulk(out, b"flags");
        simple_strings(out, spec.flags);
        resp::bulk(out, b"begin_search");
        resp::array(out, 4);
        resp::bulk(out, b"type");
        resp::bulk(out, b"index");
        resp::bulk(out, b"spec");
        resp::array(out, 2);
        resp::bulk(out, b"index");
        resp::integer(out, spec.begin_index.into());
        resp::bulk(out, b"find_keys");
        resp::array(out, 4);
        resp::bulk(out, b"type");
        resp::bulk(out, b"range");
        resp::bulk(out, b"spec");
        resp::array(out, 6);
        resp::bulk(out, b"lastkey");
        resp::integer(out, spec.last_key.into());
        resp::bulk(out, b"keystep");
        resp::integer(out, spec.key_step.into());
        resp::bulk(out, b"limit");
        resp::integer(out, spec.limit.into());
    }
    resp::array(out, c.subcommands.len());
    for sub in c.subcommands {
        info(out, sub);
    }
}

/// One `COMMAND DOCS` value: a map (a flat array in RESP2) in Redis 7's field order.
fn doc(out: &mut Vec<u8>, c: &Command) {
    let d = &c.doc;
    let fields = 4
        + usize::from(!d.doc_flags.is_empty())
        + usize::from(!d.deprecated_since.is_empty())
        + usize::from(!d.replaced_by.is_empty())
        + usize::from(!d.arguments.is_empty())
        + usize::from(!c.subcommands.is_empty());
    resp::array(out, 2 * fields);
    for (name, value) in [
        ("summary", d.summary),
        ("since", d.since),
        ("group", d.group),
        ("complexity", d.complexity),
    ] {
        resp::bulk(out, name.as_bytes());
        resp::bulk(out, value.as_bytes());
    }
    if !d.doc_flags.is_empty() {
        resp::bulk(out, b"doc_flags");
        simple_strings(out, d.doc_flags);
    }
    for (name, value) in [("deprecated_since", d.deprecated_since), ("replaced_by", d.replaced_by)]
    {
        if !value.is_empty() {
            resp::bulk(out, name.as_bytes());
            resp::bulk(out, value.as_bytes());
        }
    }
    if !d.arguments.is_empty() {
        resp::bulk(out, b"arguments");
        arguments(out, d.arguments);
    }
    if !c.subcommands.is_empty() {
        resp::bulk(out, b"subcommands");
        resp::array(out, 2 * c.subcommands.len());
        for sub in c.subcommands {
            resp::bulk(out, sub.name.as_bytes());
            doc(out, sub);
        }
    }
}

fn arguments(out: &mut Vec<u8>, args: &[Arg]) {
    resp::array(out, args.len());
    for a in args {
        let flags: Vec<&str> = [
            (a.optional, "optional"),
            (a.multiple, "multiple"),
            (a.multiple_token, "multiple_token"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        let fields = 2
            + usize::from(a.key_spec_index.is_some())
            + usize::from(a.token.is_some())
            + usize::from(a.since.is_some())
            + usize::from(a.deprecated_since.is_some())
            + usize::from(!flags.is_empty())
            + usize::from(!a.arguments.is_empty());
        resp::array(out, 2 * fields);
        resp::bulk(out, b"name");
        resp::bulk(out, a.name.as_bytes());
        resp::bulk(out, b"type");
        resp::bulk(out, a.kind.as_bytes());
        if let Some(i) = a.key_spec_index {
            resp::bulk(out, b"key_spec_index");
            resp::integer(out, i.into());
        }
        for (name, value) in
            [("token", a.token), ("since", a.since), ("deprecated_since", a.deprecated_since)]
        {
            if let Some(value) = value {
                resp::bulk(out, name.as_bytes());
                resp::bulk(out, value.as_bytes());
            }
        }
        if !flags.is_empty() {
            resp::bulk(out, b"flags");
            simple_strings(out, &flags);
        }
        if !a.arguments.is_empty() {
            resp::bulk(out, b"arguments");
            arguments(out, a.arguments);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVED: &str = "GET SET SETNX SETEX PSETEX GETSET GETDEL GETEX MGET MSET MSETNX INCR \
        DECR INCRBY DECRBY INCRBYFLOAT APPEND STRLEN GETRANGE SUBSTR SETRANGE DEL UNLINK EXISTS \
        TYPE EXPIRE PEXPIRE EXPIREAT PEXPIREAT EXPIRETIME PEXPIRETIME TTL PTTL PERSIST RENAME \
        RENAMENX KEYS SCAN RANDOMKEY DBSIZE FLUSHDB FLUSHALL PING ECHO SELECT QUIT CLIENT COMMAND \
        CONFIG INFO TIME SAVE SHUTDOWN HELLO CLUSTER READONLY READWRITE ASKING";

    #[test]
    fn the_table_is_sorted_and_has_every_command() {
        for list in
            std::iter::once(table::COMMANDS).chain(table::COMMANDS.iter().map(|c| c.subcommands))
        {
            assert!(list.windows(2).all(|w| w[0].name < w[1].name), "sorted for binary search");
        }
        for name in SERVED.split_whitespace() {
            let c = lookup(name.as_bytes()).unwrap_or_else(|| panic!("{name} is in the table"));
            assert_eq!(c.name, name.to_ascii_lowercase());
        }
        assert_eq!(table::COMMANDS.len(), SERVED.split_whitespace().count());
        assert_eq!(lookup(b"CLUSTER|Slots").map(|c| c.arity), Some(2));
        assert!(lookup(b"nosuch").is_none() && lookup(b"cluster|nosuch").is_none());
    }

    /// Byte for byte what Redis 7.0.15 answers to `COMMAND INFO get rename`.
    #[test]
    fn command_info_matches_redis_7() {
        let mut out = Vec::new();
        reply(&mut out, &[b"INFO", b"get", b"nosuch"]);
        let get = "*2\r\n*10\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n\
            *3\r\n+@read\r\n+@string\r\n+@fast\r\n*0\r\n*1\r\n*6\r\n$5\r\nflags\r\n*2\r\n+RO\r\n\
            +access\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n\
            *2\r\n$5\r\nindex\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n\
            $4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:0\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n\
            *0\r\n$-1\r\n";
        assert_eq!(String::from_utf8_lossy(&out), get);
        out.clear();
        reply(&mut out, &[b"info", b"MSET"]);
        let mset = "*1\r\n*10\r\n$4\r\nmset\r\n:-3\r\n*2\r\n+write\r\n+denyoom\r\n:1\r\n:-1\r\n\
            :2\r\n*3\r\n+@write\r\n+@string\r\n+@slow\r\n*2\r\n$26\r\nrequest_policy:multi_shard\r\n\
            $29\r\nresponse_policy:all_succeeded\r\n*1\r\n*6\r\n$5\r\nflags\r\n*2\r\n+OW\r\n\
            +update\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n\
            *2\r\n$5\r\nindex\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n\
            $4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:-1\r\n$7\r\nkeystep\r\n:2\r\n$5\r\nlimit\r\n:0\r\n\
            *0\r\n";
        assert_eq!(String::from_utf8_lossy(&out), mset);
    }

    /// Byte for byte what Redis 7.0.15 answers to `COMMAND DOCS getex`.
    #[test]
    fn command_docs_match_redis_7() {
        let mut out = Vec::new();
        reply(&mut out, &[b"DOCS", b"getex"]);
        let expected = "*2\r\n$5\r\ngetex\r\n*10\r\n$7\r\nsummary\r\n$56\r\nGet the value of a \
            key and optionally set its expiration\r\n$5\r\nsince\r\n$5\r\n6.2.0\r\n$5\r\ngroup\r\n\
            $6\r\nstring\r\n$10\r\ncomplexity\r\n$4\r\nO(1)\r\n$9\r\narguments\r\n*2\r\n*6\r\n\
            $4\r\nname\r\n$3\r\nkey\r\n$4\r\ntype\r\n$3\r\nkey\r\n$14\r\nkey_spec_index\r\n:0\r\n\
            *8\r\n$4\r\nname\r\n$10\r\nexpiration\r\n$4\r\ntype\r\n$5\r\noneof\r\n$5\r\nflags\r\n\
            *1\r\n+optional\r\n$9\r\narguments\r\n*5\r\n*6\r\n$4\r\nname\r\n$7\r\nseconds\r\n\
            $4\r\ntype\r\n$7\r\ninteger\r\n$5\r\ntoken\r\n$2\r\nEX\r\n*6\r\n$4\r\nname\r\n\
            $12\r\nmilliseconds\r\n$4\r\ntype\r\n$7\r\ninteger\r\n$5\r\ntoken\r\n$2\r\nPX\r\n\
            *6\r\n$4\r\nname\r\n$17\r\nunix-time-seconds\r\n$4\r\ntype\r\n$9\r\nunix-time\r\n\
            $5\r\ntoken\r\n$4\r\nEXAT\r\n*6\r\n$4\r\nname\r\n$22\r\nunix-time-milliseconds\r\n\
            $4\r\ntype\r\n$9\r\nunix-time\r\n$5\r\ntoken\r\n$4\r\nPXAT\r\n*6\r\n$4\r\nname\r\n\
            $7\r\npersist\r\n$4\r\ntype\r\n$10\r\npure-token\r\n$5\r\ntoken\r\n$7\r\nPERSIST\r\n";
        assert_eq!(String::from_utf8_lossy(&out), expected);
    }

    /// redis-cli's hint for a command: its `cliAddArgument` applied to our docs.
    fn hint(args: &[Arg]) -> String {
        fn one(a: &Arg) -> String {
            let token = a.token.map(|t| if t.is_empty() { "\"\"".to_string() } else { t.into() });
            let repeat = match a.kind {
                "oneof" => a.arguments.iter().map(one).collect::<Vec<_>>().join("|"),
                "block" => a.arguments.iter().map(one).collect::<Vec<_>>().join(" "),
                "pure-token" => String::new(),
                _ => a.name.to_string(),
            };
            let mut token = token.unwrap_or_default();
            if !token.is_empty() && a.kind != "pure-token" {
                token.push(' ');
            }
            let mut s = String::new();
            if a.optional {
                s.push('[');
            }
            s += &token;
            s += &repeat;
            if a.multiple {
                s += " [";
                if a.multiple_token {
                    s += &token;
                }
                s += &repeat;
                s += " ...]";
            }
            if a.optional {
                s.push(']');
            }
            s
        }
        args.iter().map(one).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn redis_cli_hints_read_as_redis_documents_them() {
        let h = |name: &str| hint(lookup(name.as_bytes()).expect("in the table").doc.arguments);
        assert_eq!(
            h("set"),
            "key value [NX|XX] [GET] [EX seconds|PX milliseconds|EXAT unix-time-seconds|\
             PXAT unix-time-milliseconds|KEEPTTL]"
        );
        assert_eq!(h("mset"), "key value [key value ...]");
        assert_eq!(h("del"), "key [key ...]");
        assert_eq!(h("cluster|keyslot"), "key");
        assert_eq!(h("scan"), "cursor [MATCH pattern] [COUNT count] [TYPE type]");
    }

    #[test]
    fn key_positions_follow_first_last_step() {
        let keys = |line: &[&str]| -> Vec<String> {
            let c = lookup(line[0].as_bytes()).expect("in the table");
            assert!(c.arity_ok(line.len()));
            c.key_positions(line.len()).map(|i| line[i].to_string()).collect()
        };
        assert_eq!(keys(&["get", "a"]), ["a"]);
        assert_eq!(keys(&["set", "a", "v", "NX"]), ["a"]);
        assert_eq!(keys(&["mset", "a", "1", "b", "2"]), ["a", "b"]);
        assert_eq!(keys(&["mget", "a", "b", "c"]), ["a", "b", "c"]);
        assert_eq!(keys(&["rename", "a", "b"]), ["a", "b"]);
        assert_eq!(keys(&["getex", "a", "EX", "10"]), ["a"]);
        assert!(keys(&["ping"]).is_empty() && keys(&["keys", "*"]).is_empty());
        assert!(keys(&["cluster", "keyslot", "a"]).is_empty());
        assert!(!lookup(b"get").expect("get").arity_ok(3));
    }

    #[test]
    fn command_getkeys_and_errors_answer_as_redis_does() {
        let run = |args: &[&[u8]]| {
            let mut out = Vec::new();
            reply(&mut out, args);
            String::from_utf8_lossy(&out).into_owned()
        };
        assert_eq!(
            run(&[b"GETKEYS", b"mset", b"a", b"1", b"b", b"2"]),
            "*2\r\n$1\r\na\r\n$1\r\nb\r\n"
        );
        assert_eq!(run(&[b"getkeys", b"nosuch", b"a"]), "-ERR Invalid command specified\r\n");
        assert_eq!(
            run(&[b"getkeys", b"get", b"a", b"b"]),
            "-ERR Invalid number of arguments specified for command\r\n"
        );
        assert_eq!(run(&[b"getkeys", b"ping", b"x"]), "-ERR The command has no key arguments\r\n");
        assert_eq!(
            run(&[b"getkeys"]),
            "-ERR wrong number of arguments for 'command|getkeys' command\r\n"
        );
        assert_eq!(run(&[b"BOGUS"]), "-ERR unknown subcommand 'BOGUS'. Try COMMAND HELP.\r\n");
        assert_eq!(run(&[b"count"]), format!(":{}\r\n", table::COMMANDS.len()));
    }
}
