"""A page of the app in chromium, measured: have its charts drawn, and does it fit the screen?
Each check is JavaScript that returns a list of what is wrong, empty when nothing is
(tests/test_browser.py waits for or asserts an empty list, and prints the list when it is not)."""

# Every visible chart has drawn each of its traces (a heatmap is an <image> of its cells) and has
# settled at its element's size. Streamlit marks a chart's place (.stPrintGraphic) before Plotly's
# code has loaded and drawn it; charts in hidden tabs draw when shown.
UNDRAWN = """() => [...document.querySelectorAll('[data-testid="stElementContainer"].stPrintGraphic')]
    .filter(e => e.offsetParent !== null).flatMap((e, i) => {
        const gd = e.querySelector('[data-testid="stPlotlyChart"] .js-plotly-plot');
        const name = `chart ${i} (${e.querySelector('.gtitle')?.textContent || 'untitled'})`;
        if (!gd || !gd._fullData || !gd.querySelector('.main-svg')) return [`${name}: no plot yet`];
        const wanted = type => gd._fullData.filter(t => t.visible === true && t.type === type).length;
        const images = [...e.querySelectorAll('.hm image')].filter(
            im => (im.getAttribute('href') || '').startsWith('data:image') && im.getBBox().width > 0).length;
        const drawn = {heatmap: images, scatter: e.querySelectorAll('.scatterlayer .trace').length,
                       bar: e.querySelectorAll('.barlayer .trace').length};
        const problems = Object.entries(drawn).filter(([type, n]) => n < wanted(type))
            .map(([type, n]) => `${name}: ${wanted(type) - n} ${type} trace(s) not drawn`);
        const chart = e.querySelector('[data-testid="stPlotlyChart"]').getBoundingClientRect();
        if (Math.abs(gd._fullLayout.height - chart.height) > 2 || Math.abs(gd._fullLayout.width - chart.width) > 2)
            problems.push(`${name}: not at its size yet`);
        return problems;
    })"""

# What a narrow screen breaks: the page wider than the screen, a chart title cut off, under Plotly's
# toolbar or running into the chart's other text, a chart of square cells that is mostly blank, a button's label truncated, a code block
# cut off (to be scrolled sideways).
LAYOUT_PROBLEMS = """() => {
    const seen = e => e.offsetParent !== null, box = e => e.getBoundingClientRect();
    // Boxes that overlap by more than 2 px: the boxes of text touching on one line are not a collision.
    const overlap = (a, b) => a.left < b.right - 2 && b.left < a.right - 2 && a.top < b.bottom - 2 && b.top < a.bottom - 2;
    const problems = [], main = document.querySelector('[data-testid="stMain"]');
    if (document.documentElement.scrollWidth > innerWidth || main.scrollWidth > main.clientWidth)
        problems.push(`the page scrolls sideways: ${main.scrollWidth} px of content in ${main.clientWidth}`);
    for (const e of [...document.querySelectorAll('[data-testid="stPlotlyChart"]')].filter(seen)) {
        const title = e.querySelector('.gtitle'), bar = e.querySelector('.modebar'), chart = box(e);
        const name = title?.textContent || 'an untitled chart';
        if (title?.textContent) {
            const t = box(title);
            if (t.left < chart.left || t.right > chart.right || t.top < chart.top) problems.push(`the title "${name}" is cut off`);
            if (bar && overlap(t, box(bar))) problems.push(`the title "${name}" is under the toolbar`);
            const hit = [...e.querySelectorAll('text')].find(x => x !== title && box(x).width > 0 && overlap(t, box(x)));
            if (hit) problems.push(`the title "${name}" runs into "${hit.textContent}"`);
        }
        const image = e.querySelector('.hm image');
        if (e.querySelector('.js-plotly-plot')._fullLayout.yaxis?.scaleanchor === 'x' && box(image).height < chart.height / 2)
            problems.push(`"${name}": its square cells fill ${Math.round(box(image).height)} of its ${Math.round(chart.height)} px`);
    }
    for (const e of main.querySelectorAll('button [data-testid="stMarkdownContainer"]'))
        if (seen(e) && e.scrollWidth > e.clientWidth) problems.push(`the button "${e.textContent}" is truncated`);
    for (const e of main.querySelectorAll('[data-testid="stCode"] pre'))
        if (seen(e) && e.scrollWidth > e.clientWidth) problems.push(`a code block is cut off: "${e.textContent.slice(0, 40)}…"`);
    return problems;
}"""

# With the Layer select scrolled to just below Streamlit's header, the heatmap under it is in full
# view: [the select's top, the heatmap's bottom, the screen's height].
CONTROLS_AND_HEATMAP = """() => {
    const header = document.querySelector('[data-testid="stHeader"]').getBoundingClientRect().bottom;
    const layer = [...document.querySelectorAll('[data-testid="stSelectbox"]')].find(e => e.innerText.startsWith('Layer'));
    document.querySelector('[data-testid="stMain"]').scrollBy(0, layer.getBoundingClientRect().top - header);
    const heatmap = document.querySelector('[data-testid="stPlotlyChart"]');
    return [layer.getBoundingClientRect().top, heatmap.getBoundingClientRect().bottom, innerHeight];
}"""
