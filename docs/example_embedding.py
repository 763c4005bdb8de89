import shutil
import tempfile

import trio

from cube.config import load_config
from cube.node import open_node
from cube.store import Phase


async def main() -> None:
    # A short path: each sandbox's envd listens on a unix socket under the state dir.
    state_dir = tempfile.mkdtemp(prefix="cube-", dir="/tmp")
    config = load_config(
        env={},  # ignore CUBE_* variables here, so the example does the same everywhere
        overrides={
            "state_dir": state_dir,
            "driver": "process",  # runs anywhere, isolates nothing; "ns" needs root on Linux
            "templates": {"base": {"memory_mb": 512}},
            "pools": {"base": {"size": 1, "concurrency": 1}},
        },
    )
    try:
        async with open_node(config) as node:
            sbx = await node.create("base", timeout=120, metadata={"run": "demo"})
            print("created", sbx.id)

            result = await sbx.run("echo hello; echo oops >&2; exit 3")
            print(repr(result.stdout), repr(result.stderr), result.exit_code)

            words: list[str] = []
            async for event, body in sbx.stream("for i in 1 2 3; do echo line $i; done"):
                if event == "data" and body.stdout:  # in chunks, as the command writes
                    words += body.stdout.decode().split()
                elif event == "end":
                    print("streamed", words, "then exit", body.exit_code)

            await sbx.files.write("notes/today.txt", "measured 42\n")  # relative to $HOME
            print("read back", await sbx.files.read("notes/today.txt"))
            print("listed", [entry.name for entry in await sbx.files.list("notes")])

            execution = await sbx.execute("x = 6 * 7\nprint('side effect')\nx")
            print("execute", execution["result"][0].text, execution["stdout"][0].text.strip())

            await sbx.pause()
            print("paused:", sbx.info.state == Phase.PAUSED)
            await sbx.resume()
            print("after resume:", (await sbx.run("echo still here")).stdout.strip())

            page = await node.list(metadata={"run": "demo"})
            print("listed sandboxes", [record.id for record in page.items] == [sbx.id])
            tree = node.tree()  # tree.dump() draws it all, like pstree
            print("tree", [actor.name for actor in tree.actors[0].children])

            await sbx.kill()
            print("killed:", sbx.info.state == Phase.KILLED)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    trio.run(main)
