//! The string commands against a running server: replies and Redis's error texts.

mod common;

use common::{bulk, ok, scratch, Reply, Server};

fn err(text: &str) -> Reply {
    Reply::Error(text.into())
}

const NOT_INT: &str = "ERR value is not an integer or out of range";

#[test]
fn set_options_and_the_get_family() {
    let dir = scratch("set-options");
    let server = Server::start(&dir.path().join("data"), &["--size", "8M", "--shards", "2"]);
    let mut c = server.client();
    assert_eq!(c.cmds(&["SET", "k", "v1", "GET"]), Reply::Bulk(None));
    assert_eq!(c.cmds(&["SET", "k", "v2", "GET"]), bulk("v1"));
    assert_eq!(c.cmds(&["SET", "k", "v3", "NX", "GET"]), bulk("v2"), "NX fails, GET answers");
    assert_eq!(c.cmds(&["GET", "k"]), bulk("v2"));
    assert_eq!(c.cmds(&["SET", "k", "v", "NX", "XX"]), err("ERR syntax error"));
    assert_eq!(c.cmds(&["SET", "k", "v", "EX", "10", "PX", "10"]), err("ERR syntax error"));
    assert_eq!(c.cmds(&["SET", "k", "v", "EX", "10", "KEEPTTL"]), err("ERR syntax error"));
    assert_eq!(c.cmds(&["SET", "k", "v", "EX"]), err("ERR syntax error"));
    assert_eq!(c.cmds(&["SET", "k", "v", "EX", "ten"]), err(NOT_INT));
    assert_eq!(
        c.cmds(&["SET", "k", "v", "EX", "0"]),
        err("ERR invalid expire time in 'set' command")
    );
    assert_eq!(
        c.cmds(&["SET", "k", "v", "PX", "-5"]),
        err("ERR invalid expire time in 'set' command")
    );
    assert_eq!(
        c.cmds(&["SET", "k", "v", "EX", "9223372036854775807"]),
        err("ERR invalid expire time in 'set' command")
    );
    assert_eq!(c.cmds(&["GET", "k"]), bulk("v2"), "failed SETs change nothing");

    assert_eq!(c.cmds(&["SETEX", "sx", "100", "a"]), ok());
    assert!(matches!(c.cmds(&["TTL", "sx"]), Reply::Int(99..=100)));
    assert_eq!(
        c.cmds(&["SETEX", "sx", "0", "a"]),
        err("ERR invalid expire time in 'setex' command")
    );
    assert_eq!(c.cmds(&["SETEX", "sx", "x", "a"]), err(NOT_INT));
    assert_eq!(c.cmds(&["PSETEX", "psx", "100000", "b"]), ok());
    assert!(matches!(c.cmds(&["PTTL", "psx"]), Reply::Int(99_000..=100_000)));
    assert_eq!(c.cmds(&["SETNX", "nx", "1"]), Reply::Int(1));
    assert_eq!(c.cmds(&["SETNX", "nx", "2"]), Reply::Int(0));

    assert_eq!(c.cmds(&["GETSET", "gs", "a"]), Reply::Bulk(None));
    assert_eq!(c.cmds(&["GETSET", "gs", "b"]), bulk("a"));
    assert_eq!(c.cmds(&["GETDEL", "gs"]), bulk("b"));
    assert_eq!(c.cmds(&["GETDEL", "gs"]), Reply::Bulk(None));
    assert_eq!(c.cmds(&["EXISTS", "gs"]), Reply::Int(0));

    assert_eq!(c.cmds(&["SET", "ge", "val"]), ok());
    assert_eq!(c.cmds(&["GETEX", "ge"]), bulk("val"));
    assert_eq!(c.cmds(&["TTL", "ge"]), Reply::Int(-1));
    assert_eq!(c.cmds(&["GETEX", "ge", "EX", "50"]), bulk("val"));
    assert!(matches!(c.cmds(&["TTL", "ge"]), Reply::Int(49..=50)));
    assert_eq!(c.cmds(&["GETEX", "ge", "PERSIST"]), bulk("val"));
    assert_eq!(c.cmds(&["TTL", "ge"]), Reply::Int(-1));
    assert_eq!(c.cmds(&["GETEX", "ge", "EX", "1", "PERSIST"]), err("ERR syntax error"));
    assert_eq!(
        c.cmds(&["GETEX", "ge", "PX", "0"]),
        err("ERR invalid expire time in 'getex' command")
    );
    assert_eq!(c.cmds(&["GETEX", "missing"]), Reply::Bulk(None));

    // MSETNX: all or nothing.
    assert_eq!(c.cmds(&["MSETNX", "a1", "1", "a2", "2", "a3", "3"]), Reply::Int(1));
    assert_eq!(c.cmds(&["MSETNX", "a4", "4", "a1", "x"]), Reply::Int(0));
    assert_eq!(c.cmds(&["EXISTS", "a4"]), Reply::Int(0), "nothing of a failed MSETNX is set");
    assert_eq!(c.cmds(&["GET", "a1"]), bulk("1"));
    assert_eq!(
        c.cmds(&["MSETNX", "a1"]),
        err("ERR wrong number of arguments for 'msetnx' command")
    );
    server.shutdown();
}

#[test]
fn incr_family_overflow_and_floats() {
    let dir = scratch("incr");
    let server = Server::start(&dir.path().join("data"), &["--size", "8M", "--shards", "2"]);
    let mut c = server.client();
    assert_eq!(c.cmds(&["INCR", "n"]), Reply::Int(1));
    assert_eq!(c.cmds(&["INCRBY", "n", "41"]), Reply::Int(42));
    assert_eq!(c.cmds(&["DECR", "n"]), Reply::Int(41));
    assert_eq!(c.cmds(&["DECRBY", "n", "-9"]), Reply::Int(50));
    assert_eq!(c.cmds(&["GET", "n"]), bulk("50"));
    assert_eq!(c.cmds(&["DECRBY", "fresh", "5"]), Reply::Int(-5));
    assert_eq!(c.cmds(&["SET", "max", "9223372036854775807"]), ok());
    assert_eq!(c.cmds(&["INCR", "max"]), err("ERR increment or decrement would overflow"));
    assert_eq!(c.cmds(&["GET", "max"]), bulk("9223372036854775807"));
    assert_eq!(c.cmds(&["SET", "min", "-9223372036854775808"]), ok());
    assert_eq!(c.cmds(&["DECR", "min"]), err("ERR increment or decrement would overflow"));
    assert_eq!(c.cmds(&["INCRBY", "n", "9223372036854775808"]), err(NOT_INT));
    assert_eq!(c.cmds(&["INCRBY", "n", "1.5"]), err(NOT_INT));
    for bad in ["abc", "1.0", " 1", "01", ""] {
        assert_eq!(c.cmds(&["SET", "s", bad]), ok());
        assert_eq!(c.cmds(&["INCR", "s"]), err(NOT_INT), "INCR of {bad:?}");
    }
    assert_eq!(c.cmds(&["GET", "s"]), bulk(""), "a failed INCR changes nothing");
    assert_eq!(c.cmds(&["INCR"]), err("ERR wrong number of arguments for 'incr' command"));

    assert_eq!(c.cmds(&["SET", "f", "10.50"]), ok());
    assert_eq!(c.cmds(&["INCRBYFLOAT", "f", "0.1"]), bulk("10.6"));
    assert_eq!(c.cmds(&["INCRBYFLOAT", "f", "-5"]), bulk("5.6"));
    assert_eq!(c.cmds(&["SET", "f", "5.0e3"]), ok());
    assert_eq!(c.cmds(&["INCRBYFLOAT", "f", "2.0e2"]), bulk("5200"));
    assert_eq!(c.cmds(&["GET", "f"]), bulk("5200"));
    assert_eq!(c.cmds(&["INCRBYFLOAT", "nf", "3"]), bulk("3"));
    assert_eq!(c.cmds(&["INCRBYFLOAT", "f", "abc"]), err("ERR value is not a valid float"));
    assert_eq!(c.cmds(&["SET", "word", "abc"]), ok());
    assert_eq!(c.cmds(&["INCRBYFLOAT", "word", "1"]), err("ERR value is not a valid float"));
    assert_eq!(c.cmds(&["SET", "big", "1e308"]), ok());
    assert_eq!(
        c.cmds(&["INCRBYFLOAT", "big", "1e308"]),
        err("ERR increment would produce NaN or Infinity")
    );
    assert_eq!(c.cmds(&["GET", "big"]), bulk("1e308"));
    server.shutdown();
}

#[test]
fn append_strlen_setrange_getrange_edges() {
    let dir = scratch("ranges");
    let server = Server::start(&dir.path().join("data"), &["--size", "8M", "--shards", "2"]);
    let mut c = server.client();
    assert_eq!(c.cmds(&["APPEND", "a", "Hello"]), Reply::Int(5));
    assert_eq!(c.cmds(&["APPEND", "a", " World"]), Reply::Int(11));
    assert_eq!(c.cmds(&["GET", "a"]), bulk("Hello World"));
    assert_eq!(c.cmds(&["STRLEN", "a"]), Reply::Int(11));
    assert_eq!(c.cmds(&["STRLEN", "none"]), Reply::Int(0));

    assert_eq!(c.cmds(&["SET", "s", "This is a string"]), ok());
    assert_eq!(c.cmds(&["GETRANGE", "s", "0", "3"]), bulk("This"));
    assert_eq!(c.cmds(&["GETRANGE", "s", "-3", "-1"]), bulk("ing"));
    assert_eq!(c.cmds(&["GETRANGE", "s", "0", "-1"]), bulk("This is a string"));
    assert_eq!(c.cmds(&["GETRANGE", "s", "10", "100"]), bulk("string"));
    assert_eq!(c.cmds(&["GETRANGE", "s", "5", "3"]), bulk(""));
    assert_eq!(c.cmds(&["GETRANGE", "s", "-1", "-5"]), bulk(""));
    assert_eq!(c.cmds(&["GETRANGE", "none", "0", "-1"]), bulk(""));
    assert_eq!(c.cmds(&["GETRANGE", "s", "a", "1"]), err(NOT_INT));

    assert_eq!(c.cmds(&["SET", "r", "Hello World"]), ok());
    assert_eq!(c.cmds(&["SETRANGE", "r", "6", "Redis"]), Reply::Int(11));
    assert_eq!(c.cmds(&["GET", "r"]), bulk("Hello Redis"));
    assert_eq!(c.cmds(&["SETRANGE", "pad", "5", "x"]), Reply::Int(6));
    assert_eq!(c.cmds(&["GET", "pad"]), bulk(b"\0\0\0\0\0x"), "padded with zero bytes");
    assert_eq!(c.cmds(&["SETRANGE", "r", "13", "!"]), Reply::Int(14));
    assert_eq!(c.cmds(&["GET", "r"]), bulk(b"Hello Redis\0\0!"));
    assert_eq!(c.cmds(&["SETRANGE", "empty", "3", ""]), Reply::Int(0));
    assert_eq!(c.cmds(&["EXISTS", "empty"]), Reply::Int(0), "an empty SETRANGE creates nothing");
    assert_eq!(c.cmds(&["SETRANGE", "r", "100", ""]), Reply::Int(14));
    assert_eq!(c.cmds(&["SETRANGE", "r", "-1", "x"]), err("ERR offset is out of range"));
    assert!(c
        .cmds(&["SETRANGE", "r", "536870912", "x"])
        .is_error_with("ERR string exceeds maximum allowed size (proto-max-bulk-len)"));
    let big = "x".repeat(65_530);
    assert_eq!(c.cmds(&["SET", "big", &big]), ok());
    assert_eq!(c.cmds(&["APPEND", "big", "012345"]), Reply::Int(65_536), "up to one record");
    // Past one record the value becomes a large value (tests/large_values.rs).
    assert_eq!(c.cmds(&["APPEND", "big", "6789"]), Reply::Int(65_540));
    assert_eq!(c.cmds(&["GET", "big"]), bulk(format!("{big}0123456789")));
    assert_eq!(c.cmds(&["TYPE", "big"]), Reply::Simple("string".into()));
    assert_eq!(c.cmds(&["TYPE", "none"]), Reply::Simple("none".into()));
    server.shutdown();
}
