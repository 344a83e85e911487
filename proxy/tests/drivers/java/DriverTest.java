// PostgreSQL JDBC driver (pgjdbc) through Sluice: with prepareThreshold=1 every PreparedStatement
// becomes a named server-side statement from its first execution; they are reused from more
// concurrent connections than the pool has server connections, so statements hop between server
// connections.
//
// Connection settings come from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE. With DRIVER_TLS_CA
// (a PEM CA bundle) it connects with TLS, verifying the server's certificate and host name against
// it (sslmode=verify-full&sslrootcert=..., read by pgjdbc's default LibPQFactory); without it, in
// plaintext (sslmode=disable).
// Run by proxy/tests/it/drivers.rs:
//   java -cp /usr/share/java/postgresql.jar DriverTest.java
// (Debian package libpostgresql-jdbc-java; single-file source launch, Java 11+).
// Prints `OK jdbc <n> operations` and exits 0, or prints the error and exits 1.

import java.math.BigDecimal;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Types;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Objects;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicLong;

public class DriverTest {
    static final int WORKERS = intEnv("DRIVER_WORKERS", 10);
    static final int ITERATIONS = intEnv("DRIVER_ITERATIONS", 50);
    static final String TABLE = "drv_jdbc";
    static final long DEADLINE_MS = 90_000;
    static final AtomicLong OPERATIONS = new AtomicLong();

    static int intEnv(String name, int dflt) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? dflt : Integer.parseInt(v);
    }

    static String env(String name, String dflt) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? dflt : v;
    }

    static String sslParams() {
        String ca = System.getenv("DRIVER_TLS_CA");
        if (ca == null || ca.isEmpty()) {
            return "sslmode=disable";
        }
        return "sslmode=verify-full&sslrootcert=" + URLEncoder.encode(ca, StandardCharsets.UTF_8);
    }

    static Connection connect() throws SQLException {
        String url = "jdbc:postgresql://" + env("PGHOST", "127.0.0.1") + ":" + env("PGPORT", "5432")
                + "/" + env("PGDATABASE", "postgres")
                + "?prepareThreshold=1&" + sslParams() + "&connectTimeout=30&socketTimeout=60"
                + "&ApplicationName=sluice-driver-jdbc";
        Properties props = new Properties();
        props.setProperty("user", env("PGUSER", "postgres"));
        props.setProperty("password", env("PGPASSWORD", ""));
        return DriverManager.getConnection(url, props);
    }

    static void eq(Object actual, Object expected, String what) {
        boolean same = actual instanceof byte[] && expected instanceof byte[]
                ? Arrays.equals((byte[]) actual, (byte[]) expected)
                : Objects.equals(actual, expected);
        if (!same) {
            throw new AssertionError(what + ": got " + show(actual) + ", expected " + show(expected));
        }
    }

    static String show(Object o) {
        return o instanceof byte[] ? Arrays.toString((byte[]) o) : String.valueOf(o);
    }

    static void setup() throws SQLException {
        try (Connection c = connect(); Statement s = c.createStatement()) {
            s.execute("CREATE TABLE IF NOT EXISTS " + TABLE + " ("
                    + " id bigserial PRIMARY KEY, worker int NOT NULL, i int NOT NULL, txt text,"
                    + " data bytea, ts timestamptz, num numeric, note text)");
            s.execute("DELETE FROM " + TABLE);
            OPERATIONS.addAndGet(2);
        }
    }

    static final String ECHO = "SELECT ?::int4 AS i, ?::text AS t, ?::bytea AS b, ?::text AS n,"
            + " ?::timestamptz AS ts, ?::numeric AS num, ?::int8 AS big";
    static final String INSERT = "INSERT INTO " + TABLE + " (worker, i, txt, data, ts, num, note)"
            + " VALUES (?, ?, ?, ?, ?, ?, ?)";
    static final String GET_ROW = "SELECT worker, i, txt, data, ts, num, note FROM " + TABLE + " WHERE id = ?";
    static final String COUNT = "SELECT count(*)::int FROM " + TABLE + " WHERE worker = ?";
    static final String SERIES = "SELECT sum(g)::int8, count(*)::int FROM generate_series(1, ?::int) AS g";
    static final String DIVIDE = "SELECT 10 / ?::int";

    static int countRows(PreparedStatement count, int w) throws SQLException {
        count.setInt(1, w);
        try (ResultSet rs = count.executeQuery()) {
            rs.next();
            OPERATIONS.incrementAndGet();
            return rs.getInt(1);
        }
    }

    static void bindRow(PreparedStatement ps, int w, int i, String txt, byte[] data, OffsetDateTime ts,
            BigDecimal num, String note) throws SQLException {
        ps.setInt(1, w);
        ps.setInt(2, i);
        ps.setString(3, txt);
        ps.setBytes(4, data);
        ps.setObject(5, ts);
        ps.setBigDecimal(6, num);
        if (note == null) {
            ps.setNull(7, Types.VARCHAR);
        } else {
            ps.setString(7, note);
        }
    }

    static long insertReturningId(PreparedStatement insert) throws SQLException {
        try (ResultSet rs = insert.executeQuery()) {
            if (!rs.next()) {
                throw new AssertionError("INSERT ... RETURNING gave no row");
            }
            OPERATIONS.incrementAndGet();
            return rs.getLong(1);
        }
    }

    static int worker(int w) throws SQLException {
        int committed = 0;
        try (Connection c = connect();
                PreparedStatement echo = c.prepareStatement(ECHO);
                PreparedStatement insert = c.prepareStatement(INSERT + " RETURNING id");
                PreparedStatement batch = c.prepareStatement(INSERT);
                PreparedStatement getRow = c.prepareStatement(GET_ROW);
                PreparedStatement count = c.prepareStatement(COUNT);
                PreparedStatement series = c.prepareStatement(SERIES);
                PreparedStatement divide = c.prepareStatement(DIVIDE);
                PreparedStatement deleteBatch = c.prepareStatement(
                        "DELETE FROM " + TABLE + " WHERE worker = ? AND i >= 10000")) {
            for (int i = 0; i < ITERATIONS; i++) {
                // 1. Every parameter type, re-executing the same prepared statement.
                byte[] data = {0, 1, 2, (byte) 0xfe, (byte) 0xff, (byte) w, (byte) i, 0x5c, 0x27};
                OffsetDateTime ts = OffsetDateTime.of(2024, 1, 1, 12, 0, 0, 0, ZoneOffset.UTC)
                        .plusSeconds(w * 1000L + i);
                String text = "w" + w + "-i" + i + "-ünïcødé-'quote'";
                BigDecimal num = new BigDecimal((w * 1000 + i) + ".125");
                long big = (1L << 40) + w * 1000L + i;
                echo.setInt(1, w * 1000 + i);
                echo.setString(2, text);
                echo.setBytes(3, data);
                echo.setNull(4, Types.VARCHAR);
                echo.setObject(5, ts);
                echo.setBigDecimal(6, num);
                echo.setLong(7, big);
                try (ResultSet rs = echo.executeQuery()) {
                    if (!rs.next()) {
                        throw new AssertionError("echo gave no row");
                    }
                    eq(rs.getInt("i"), w * 1000 + i, "echo int");
                    eq(rs.getString("t"), text, "echo text");
                    eq(rs.getBytes("b"), data, "echo bytea");
                    eq(rs.getString("n"), null, "echo NULL");
                    eq(rs.wasNull(), true, "echo wasNull");
                    eq(rs.getObject("ts", OffsetDateTime.class).toInstant(), ts.toInstant(), "echo timestamptz");
                    eq(rs.getBigDecimal("num"), num, "echo numeric");
                    eq(rs.getLong("big"), big, "echo int8");
                    eq(rs.next(), false, "echo row count");
                }
                OPERATIONS.incrementAndGet();

                // 2. An explicit transaction: insert, read back, count, commit.
                String note = i % 3 == 0 ? null : "note";
                c.setAutoCommit(false);
                bindRow(insert, w, i, text, data, ts, num, note);
                long id = insertReturningId(insert);
                getRow.setLong(1, id);
                try (ResultSet rs = getRow.executeQuery()) {
                    eq(rs.next(), true, "inserted row present");
                    eq(rs.getInt(1), w, "row worker");
                    eq(rs.getInt(2), i, "row i");
                    eq(rs.getString(3), text, "row txt");
                    eq(rs.getBytes(4), data, "row data");
                    eq(rs.getObject(5, OffsetDateTime.class).toInstant(), ts.toInstant(), "row ts");
                    eq(rs.getBigDecimal(6), num, "row num");
                    eq(rs.getString(7), note, "row note");
                    eq(rs.next(), false, "one row");
                }
                OPERATIONS.incrementAndGet();
                eq(countRows(count, w), committed + 1, "count inside transaction");
                c.commit();
                c.setAutoCommit(true);
                committed++;
                OPERATIONS.incrementAndGet();

                // 3. Rolled back: the row is gone afterwards.
                if (i % 5 == 0) {
                    c.setAutoCommit(false);
                    bindRow(insert, w, -i, "rolled back", data, ts, BigDecimal.ZERO, null);
                    long gone = insertReturningId(insert);
                    eq(countRows(count, w), committed + 1, "count before rollback");
                    c.rollback();
                    c.setAutoCommit(true);
                    getRow.setLong(1, gone);
                    try (ResultSet rs = getRow.executeQuery()) {
                        eq(rs.next(), false, "rolled back row");
                    }
                    OPERATIONS.addAndGet(2);
                }

                // 4. An error inside a transaction, then rollback; statements still work after.
                if (i % 10 == 3) {
                    c.setAutoCommit(false);
                    divide.setInt(1, 5);
                    try (ResultSet rs = divide.executeQuery()) {
                        rs.next();
                        eq(rs.getInt(1), 2, "10 / 5");
                    }
                    divide.setInt(1, 0);
                    try (ResultSet rs = divide.executeQuery()) {
                        throw new AssertionError("division by zero did not fail");
                    } catch (SQLException e) {
                        eq(e.getSQLState(), "22012", "SQLSTATE of division by zero");
                    }
                    c.rollback();
                    c.setAutoCommit(true);
                    OPERATIONS.addAndGet(3);
                }

                // 5. A batch (addBatch / executeBatch) in a transaction, checked and removed again.
                if (i % 10 == 7) {
                    c.setAutoCommit(false);
                    for (int k = 0; k < 5; k++) {
                        bindRow(batch, w, 10000 + k, "batch" + k, data, ts, BigDecimal.valueOf(k), null);
                        batch.addBatch();
                    }
                    int[] counts = batch.executeBatch();
                    eq(counts.length, 5, "batch size");
                    for (int n : counts) {
                        eq(n, 1, "batch update count");
                    }
                    deleteBatch.setInt(1, w);
                    eq(deleteBatch.executeUpdate(), 5, "deleted batch rows");
                    c.commit();
                    c.setAutoCommit(true);
                    OPERATIONS.addAndGet(7);
                }

                // 6. A mix of other statements.
                int n = 1 + (w + i) % 20;
                series.setInt(1, n);
                try (ResultSet rs = series.executeQuery()) {
                    rs.next();
                    eq(rs.getLong(1), (long) n * (n + 1) / 2, "sum of series");
                    eq(rs.getInt(2), n, "count of series");
                }
                try (PreparedStatement rows = c.prepareStatement(
                        "SELECT g, repeat(?::text, g) FROM generate_series(1, ?::int) AS g ORDER BY g")) {
                    rows.setString(1, "ab");
                    rows.setInt(2, 3);
                    List<String> got = new ArrayList<>();
                    try (ResultSet rs = rows.executeQuery()) {
                        while (rs.next()) {
                            got.add(rs.getInt(1) + ":" + rs.getString(2));
                        }
                    }
                    eq(got, List.of("1:ab", "2:abab", "3:ababab"), "rows");
                }
                eq(countRows(count, w), committed, "count after iteration");
                OPERATIONS.addAndGet(2);
            }
        }
        return committed;
    }

    public static void main(String[] args) throws Exception {
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(DEADLINE_MS);
            } catch (InterruptedException e) {
                return;
            }
            System.out.println("FAIL jdbc: not done after " + DEADLINE_MS + " ms");
            System.out.flush();
            Runtime.getRuntime().halt(1);
        });
        watchdog.setDaemon(true);
        watchdog.start();

        try {
            setup();
            int[] results = new int[WORKERS];
            List<String> failures = java.util.Collections.synchronizedList(new ArrayList<>());
            List<Thread> threads = new ArrayList<>();
            for (int w = 0; w < WORKERS; w++) {
                final int id = w;
                Thread t = new Thread(() -> {
                    try {
                        results[id] = worker(id);
                    } catch (Throwable e) {
                        java.io.StringWriter sw = new java.io.StringWriter();
                        e.printStackTrace(new java.io.PrintWriter(sw));
                        failures.add("worker " + id + ": " + sw);
                    }
                });
                threads.add(t);
                t.start();
            }
            for (Thread t : threads) {
                t.join();
            }
            if (!failures.isEmpty()) {
                System.out.println("FAIL jdbc:\n" + String.join("\n", failures));
                System.exit(1);
            }
            int total;
            try (Connection c = connect();
                    PreparedStatement ps = c.prepareStatement("SELECT count(*)::int FROM " + TABLE);
                    ResultSet rs = ps.executeQuery()) {
                rs.next();
                total = rs.getInt(1);
                OPERATIONS.incrementAndGet();
            }
            eq(total, Arrays.stream(results).sum(), "total rows");
            eq(total, WORKERS * ITERATIONS, "total rows");
            System.out.println("OK jdbc " + OPERATIONS.get() + " operations");
            System.exit(0);
        } catch (Throwable e) {
            System.out.println("FAIL jdbc:");
            e.printStackTrace(System.out);
            System.exit(1);
        }
    }
}
